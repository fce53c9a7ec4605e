"""Bad and odd input, generated (hypothesis): the CLI refuses nonsense with one line that names it, and never
answers it with a traceback, a hang or a verdict. Every family starts from the real inputs in the repository
(profiles, committed results, a baseline built from them, calibration.json, sweep files) and mutates them.

The contract, the collecting mode and the environment variables are described in tests/fuzz_inputs.py:
    QLORA_BENCH_FUZZ_COLLECT=/tmp/fuzz.jsonl pytest tests/test_fuzz_inputs.py   # catalogue, do not fail
    python tests/fuzz_inputs.py /tmp/fuzz.jsonl                                   # grouped summary
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from unittest import mock

import pytest
import yaml
from fuzz_inputs import (
    ACCEPT,
    EITHER,
    ODD_ENTRIES,
    PLACEHOLDER,
    REFUSE,
    REPO,
    Invocation,
    Part,
    check_example,
    example_dir,
    examples,
    run_cli,
    short,
    write_odd_entry,
    write_summary,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st


def fuzz(weight: float):
    """Hypothesis settings of every test here: fixed seed, no deadline, its share of the examples."""
    return settings(
        max_examples=examples(weight),
        derandomize=True,
        deadline=None,
        print_blob=True,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
    )


def always(cases: list):
    """Run these cases in every run, before the generated ones: the inputs the contract names explicitly."""

    def decorate(test):
        for case in reversed(cases):
            test = example(case)(test)
        return test

    return decorate


@pytest.fixture(scope="module", autouse=True)
def committed_files_stay_untouched():
    """No example may write into the repository (calibrate / baseline update without --out would)."""
    watched = [REPO / "qlora_bench" / "calibration.json", *sorted((REPO / "results").rglob("*"))]

    def digest():
        return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in watched if p.is_file()}

    before = digest()
    yield
    write_summary()
    assert digest() == before, "a fuzz example changed committed files (or someone else did during the run)"


# ==== values ==================================================================================================
@dataclass(frozen=True)
class Value:
    """A value as typed on the command line or written into a file, and what the tool must do with it."""

    text: str
    verdict: str  # accept | refuse | either
    why: str  # what kind of value it is, in words
    names: tuple[str, ...] = ()  # words the refusal must contain instead of the flag's / field's own

    def __repr__(self) -> str:
        return f"Value({short(self.text, 40)!r}, {self.verdict}, {self.why!r})"


def values(verdict: str, why: str, *texts: str, names: tuple[str, ...] = ()) -> list[Value]:
    return [Value(t, verdict, why, names) for t in texts]


TEN_TO_400 = "1" + "0" * 400  # `--batch 1` followed by 400 zeros
DIGITS_5000 = "9" * 5000  # more digits than Python converts by default
random_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=24)


def mostly(curated: list[Value], *others: st.SearchStrategy[Value]) -> st.SearchStrategy[Value]:
    """Curated values four times as often as the other strategies' values. Hypothesis favours the first entries
    of a list, so curated lists start with the bad values."""
    return st.one_of(*[st.sampled_from(curated)] * 4, *others)


def unparseable_numbers() -> list[Value]:
    return [
        *values(REFUSE, "NaN / infinity", "nan", "NaN", "inf", "-inf", "Infinity", "1e400"),
        *values(REFUSE, "not a number", "", " ", "abc", "½", "x" * 10_000, "4 096", "one"),
    ]


def count_values(plausible_max: int, suffixed: dict[str, str] | None = None) -> st.SearchStrategy[Value]:
    """A positive count (--batch, --seq, ...): plausible, odd spellings, and nonsense."""
    nonsense = [
        *values(REFUSE, "zero", "0", "-0"),
        *values(REFUSE, "negative", "-1", "-2048"),
        *values(REFUSE, "fraction", "1.5", "0.5"),
        *values(REFUSE, "beyond any physical bound", TEN_TO_400, DIGITS_5000, str(10**21), "-" + TEN_TO_400),
        *unparseable_numbers(),
    ]
    odd = values(
        EITHER, "odd spelling", " 16 ", "+16", "0016", "1_024", "١٦", "１６", "16.0", "1e3", "0x10", "\u200b16"
    )
    plausible = values(ACCEPT, "plausible", "1", "2", str(plausible_max))
    return mostly(
        nonsense + [Value(t, v, "suffixed size") for t, v in (suffixed or {}).items()] + odd + plausible,
        st.integers(1, plausible_max).map(lambda n: Value(str(n), ACCEPT, "plausible")),
        st.integers(plausible_max + 1, 10**14).map(lambda n: Value(str(n), EITHER, "large")),
        random_text.map(lambda t: Value(t, EITHER, "random text")),
    )


def choice_values(valid: list[str], odd_ok: list[str], odd: list[str], bad: list[str]) -> st.SearchStrategy[Value]:
    """A value from a fixed vocabulary (--method, --optimizer, ...)."""
    return mostly(
        values(REFUSE, "not in the vocabulary", *bad, "", " ", "x" * 5000)
        + values(ACCEPT, "other case", *odd_ok)
        + values(EITHER, "odd spelling", *odd)
        + values(ACCEPT, "valid", *valid),
        random_text.map(lambda t: Value(t, EITHER, "random text")),
    )


def alpha_values() -> st.SearchStrategy[Value]:
    return mostly(
        unparseable_numbers()
        + values(REFUSE, "zero or negative", "0", "-1", "-16", "1e-400")
        + values(EITHER, "odd", " 32 ", "1e5", "32_0")
        + values(ACCEPT, "plausible", "16", "16.5", "0.5", "8.0"),
        st.integers(1, 256).map(lambda n: Value(str(n), ACCEPT, "plausible")),
        random_text.map(lambda t: Value(t, EITHER, "random text")),
    )


def dropout_values() -> st.SearchStrategy[Value]:
    return mostly(
        unparseable_numbers()
        + values(REFUSE, "outside [0, 1)", "1", "1.0", "-0.1", "2", "-1")
        + values(EITHER, "odd", "1e-9", "5%", ".05")
        + values(ACCEPT, "plausible", "0", "0.0", "0.05", "0.1", "0.5", "0.99"),
        random_text.map(lambda t: Value(t, EITHER, "random text")),
    )


# ---- the built-in models and GPUs -----------------------------------------------------------------------------
@cache
def model_profiles() -> dict[str, dict]:
    return {(d := json.loads(p.read_text()))["name"]: d for p in sorted((REPO / "profiles" / "models").glob("*.json"))}


@cache
def gpu_profiles() -> dict[str, dict]:
    return {(d := json.loads(p.read_text()))["name"]: d for p in sorted((REPO / "profiles" / "gpus").glob("*.json"))}


LINEAR_MODULES = {  # module names a comma list of --targets may use, per model_type
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
LLAMA_LIKE_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_values() -> st.SearchStrategy[Value]:
    names = [n for name, d in model_profiles().items() for n in (name, *d.get("aliases", []), d.get("hf_id"))]
    no_such_model = [
        *("", " ", "nosuch-model", "~nosuchuser/x", "~/nope.json", "missing.json", "org/nosuch-model"),
        *("a" * 300, "dir/" + "b" * 300 + "/config.json", "x" * 10_000),  # longer than a file name may be
        *("8b\n", "ллама-8b", ".", "/", "/dev/null"),
    ]
    return mostly(
        values(REFUSE, "no such model", *no_such_model)
        + values(ACCEPT, "profile, other case", "LLAMA-3.1-8B", "Mixtral", "8B")
        + values(ACCEPT, "profile", "8b", "llama-3.1-70b", "mixtral-8x7b", "phi-3-mini", "meta-llama/Llama-3.1-8B"),
        st.sampled_from([n for n in names if n]).map(lambda n: Value(n, ACCEPT, "profile")),
        random_text.map(lambda t: Value(t, EITHER, "random text")),
    )


def gpu_values() -> st.SearchStrategy[Value]:
    names = [n for name, d in gpu_profiles().items() for n in (name, *d.get("aliases", []))]
    sizes = ["24gb", "48gb", "80gb", "16GiB", "24 GB", "2x24gb", "2xh100", "8x80gb", "1.5gb", "H100", "RTX-4090"]
    return mostly(
        [Value(n, REFUSE, "a bare number", names=(f"{n}gb",)) for n in ("24", "48", "80", "16", "40")]
        + values(EITHER, "odd", "24g", "24 gib", "２４gb", "0.5gb", "2000gb", "1x24gb", "24GB ")
        + values(REFUSE, "NaN / infinity", "nangb", "infgb", "nan", "inf", "1e400gb", TEN_TO_400 + "gb")
        + values(REFUSE, "zero or negative", "0gb", "-24gb", "0x24gb")
        + values(REFUSE, "too many GPUs", "65x24gb", DIGITS_5000 + "x24gb", TEN_TO_400 + "xh100")
        + values(REFUSE, "no such GPU", "", "  ", "x", "24tb", "24mb", "gb", "24 GB per GPU", "x" * 5000)
        + values(ACCEPT, "profile or size", *sizes),
        st.sampled_from(names).map(lambda n: Value(n, ACCEPT, "profile or size")),
        random_text.map(lambda t: Value(t, EITHER, "random text")),
    )


def target_values(model_type: str) -> st.SearchStrategy[Value]:
    modules = LINEAR_MODULES.get(model_type, LLAMA_LIKE_MODULES)
    comma_lists = st.lists(st.sampled_from(modules), min_size=1, max_size=4, unique=True).map(",".join)
    return mostly(
        values(REFUSE, "empty target list", ",", " , ", ",,", "", " ")
        + values(REFUSE, "no such module", "foo_proj", f"{modules[0]},nonexistent", "ｑ_proj", "x" * 5000)
        + values(EITHER, "odd spelling", "ALL-LINEAR", f"{modules[0]}, {modules[1]}", f"{modules[0]},")
        + values(ACCEPT, "preset", "all-linear", "attn", "mlp"),
        comma_lists.map(lambda t: Value(t, ACCEPT, "module list")),
        random_text.map(lambda t: Value(t, EITHER, "random text")),
    )


# ==== a. plan and infer flags ===================================================================================
FLAG_NAMES = {  # words that name a flag in an error message
    "--batch": ("--batch", "batch"),
    "--seq": ("--seq", "seq"),
    "--grad-accum": ("--grad-accum", "grad-accum", "grad_accum", "accumulation"),
    "--rank": ("--rank", "rank"),
    "--alpha": ("--alpha", "alpha"),
    "--dropout": ("--dropout", "dropout"),
    "--targets": ("--targets", "target"),
    "--gpu": ("--gpu", "gpu"),
    "--model": ("--model", "model"),
    "--epoch-tokens": ("--epoch-tokens", "epoch"),
    "--method": ("--method", "method"),
    "--quant": ("--quant", "quant"),
    "--optimizer": ("--optimizer", "optimizer"),
    "--attn": ("--attn", "attention", "attn"),
    "--compute-dtype": ("--compute-dtype", "dtype"),
    "--context": ("--context", "context"),
    "--prompt": ("--prompt", "prompt"),
    "--adapters": ("--adapters", "adapter"),
    "--memory-tolerance": ("--memory-tolerance", "memory tolerance", "memory-tolerance", "memory_tolerance"),
    "--throughput-tolerance": ("--throughput-tolerance", "throughput tolerance", "throughput-tolerance"),
    "--shard": ("--shard", "shard"),
    "--timeout": ("--timeout", "timeout"),
}
LORA_ONLY = ("--alpha", "--dropout", "--targets")  # irrelevant to --method full: range errors may be ignored


def flag_value_strategies(command: str, model_type: str) -> dict[str, st.SearchStrategy[Value]]:
    common = {
        "--model": model_values(),
        "--gpu": gpu_values(),
        "--batch": count_values(64),
        "--rank": count_values(64),
        "--alpha": alpha_values(),
        "--targets": target_values(model_type),
    }
    if command == "infer":
        return {
            **common,
            "--context": count_values(131_072),
            "--prompt": count_values(4096),
            "--adapters": count_values(16),
        }
    return {
        **common,
        "--seq": count_values(32_768, {"8k": ACCEPT, "4k": EITHER, "16K": EITHER, "8 k": EITHER, "8kb": EITHER}),
        "--grad-accum": count_values(64),
        "--dropout": dropout_values(),
        "--epoch-tokens": count_values(
            10**11, {"100M": ACCEPT, "10M": EITHER, "1B": EITHER, "500k": EITHER, "2.5M": EITHER, "100m": EITHER}
        ),
        "--method": choice_values(
            ["qlora", "lora", "full", "all"], ["QLoRA", "LoRA", "FULL", "Lora"], ["q-lora"], ["none", "qlora4"]
        ),
        "--quant": choice_values(["nf4", "fp4"], [], ["NF4", "FP4"], ["int4", "nf8", "4bit"]),
        "--optimizer": choice_values(
            ["adamw_torch", "adamw_torch_fused", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "sgd"],
            [],
            ["ADAMW_TORCH", "Paged_AdamW_8bit"],
            ["adam", "paged", "sgd2"],
        ),
        "--attn": choice_values(["sdpa", "eager", "flash_attention_2"], [], ["SDPA", "flash-attention-2"], ["flash"]),
        "--compute-dtype": choice_values(["bf16", "fp16", "fp32"], [], ["BF16", "bfloat16"], ["fp8", "int8"]),
    }


@dataclass(frozen=True)
class FlagCase:
    command: str  # plan | infer
    model: str  # the profile used when --model is not among the overrides
    overrides: tuple[tuple[str, Value, bool], ...]  # (flag, value, written as --flag=value)
    json: bool

    @property
    def tag(self) -> str:
        return "+".join(f"{flag}:{value.why}" for flag, value, _ in self.overrides)

    def build(self, tmp: Path) -> Invocation:
        given_ = {"--model": self.model, "--gpu": "24gb"}
        given_.update({flag: value.text for flag, value, _ in self.overrides})
        argv = [self.command, "--model", given_["--model"], "--gpu", given_["--gpu"]]
        for flag, value, equals in self.overrides:
            if flag not in ("--model", "--gpu"):
                argv += [f"{flag}={value.text}"] if equals else [flag, value.text]
        argv += ["--json"] if self.json else []
        method = given_.get("--method", "qlora").strip().lower()
        parts = [self._part(flag, value, method) for flag, value, _ in self.overrides]
        return Invocation(argv, parts + self._combination_parts(given_, method))

    @staticmethod
    def _part(flag: str, value: Value, method: str) -> Part:
        verdict = value.verdict
        range_only = value.why in ("zero or negative", "outside [0, 1)", "no such module")
        if method == "full" and flag in LORA_ONLY and verdict == REFUSE and range_only:
            verdict = EITHER  # full fine-tuning has no adapters: ignoring --alpha -1 there is fine too
        names = value.names or FLAG_NAMES[flag]
        if flag == "--model":  # naming the value (a hub id, a path, or just its file name) will do
            names += tuple(n for n in (value.text.strip(), Path(value.text.strip()).name) if len(n) >= 3)
        return Part(f"{flag} {short(value.text, 30)!r} ({value.why})", verdict, names)

    @staticmethod
    def _combination_parts(given_: dict, method: str) -> list[Part]:
        out = []
        if given_.get("--quant", "").strip().lower() == "fp4" and method in ("lora", "full"):
            out.append(Part(f"--quant fp4 with --method {method}", REFUSE, FLAG_NAMES["--quant"]))
        try:
            context, prompt = int(given_.get("--context", "4096")), int(given_.get("--prompt", "2048"))
        except ValueError:
            return out
        if 0 < context < prompt:
            out.append(Part("--context shorter than --prompt", REFUSE, FLAG_NAMES["--context"] + ("prompt",)))
        return out


@st.composite
def flag_cases(draw, command: str) -> FlagCase:
    model = draw(st.sampled_from(sorted(model_profiles())))
    strategies = flag_value_strategies(command, model_profiles()[model]["config"]["model_type"])
    how_many = draw(st.sampled_from([1, 1, 1, 2, 3]))  # mostly one: a refusal of one value hides the others
    flags = draw(st.lists(st.sampled_from(sorted(strategies)), min_size=how_many, max_size=how_many, unique=True))
    overrides = tuple((f, draw(strategies[f]), draw(st.booleans())) for f in flags)
    return FlagCase(command, model, overrides, draw(st.booleans()))


def flags(command: str, *pairs: tuple[str, str, str, str], model="llama-3.1-8b", json=False) -> FlagCase:
    """A FlagCase from (flag, text, verdict, why) tuples."""
    return FlagCase(command, model, tuple((f, Value(t, v, why), False) for f, t, v, why in pairs), json)


def gpu_bare(n: str) -> FlagCase:
    """`--gpu 24`: refused with a hint that names 24gb."""
    return FlagCase("plan", "llama-3.1-8b", (("--gpu", Value(n, REFUSE, "a bare number", (f"{n}gb",)), False),), False)


PLAN_CASES_NAMED = [
    flags("plan", ("--method", "QLoRA", ACCEPT, "other case")),
    flags("plan", ("--seq", "8k", ACCEPT, "suffixed size"), json=True),
    flags("plan", ("--epoch-tokens", "100M", ACCEPT, "suffixed size"), json=True),
    flags("plan", ("--method", "all", ACCEPT, "valid"), json=True),
    gpu_bare("24"),
    flags("plan", ("--batch", TEN_TO_400, REFUSE, "beyond any physical bound")),
    flags("plan", ("--epoch-tokens", TEN_TO_400, REFUSE, "beyond any physical bound")),
    flags("plan", ("--seq", str(10**21), REFUSE, "beyond any physical bound")),
    flags("plan", ("--gpu", DIGITS_5000 + "x24gb", REFUSE, "too many GPUs")),
    flags("plan", ("--targets", ",", REFUSE, "empty target list")),
    flags("plan", ("--alpha", "nan", REFUSE, "NaN / infinity")),
    flags("plan", ("--alpha", "inf", REFUSE, "NaN / infinity"), json=True),
    flags("plan", ("--dropout", "nan", REFUSE, "NaN / infinity")),
    flags("plan", ("--model", "~nosuchuser/x", REFUSE, "no such model")),
    flags("plan", ("--model", "a" * 300, REFUSE, "no such model")),
    flags("plan", ("--model", "", REFUSE, "no such model")),
    flags("plan", ("--batch", "0", REFUSE, "zero")),
    flags("plan", ("--seq", "-1", REFUSE, "negative")),
    flags("plan", ("--rank", " ", REFUSE, "not a number")),
    flags("plan", ("--grad-accum", "1.5", REFUSE, "fraction")),
    flags("plan", ("--gpu", "nangb", REFUSE, "NaN / infinity")),
    flags("plan", ("--gpu", "0gb", REFUSE, "zero or negative")),
    flags("plan", ("--method", "", REFUSE, "not in the vocabulary")),
    flags("plan", ("--quant", "fp4", ACCEPT, "valid"), ("--method", "lora", ACCEPT, "valid")),
]


@fuzz(0.26)
@always(PLAN_CASES_NAMED)
@given(flag_cases("plan"))
def test_plan_flags(case):
    check_example("plan-flags", case.tag, case.build)


INFER_CASES_NAMED = [
    flags("infer", ("--alpha", "nan", REFUSE, "NaN / infinity")),
    flags("infer", ("--batch", TEN_TO_400, REFUSE, "beyond any physical bound")),
    flags("infer", ("--context", "0", REFUSE, "zero")),
    flags("infer", ("--prompt", "8192", ACCEPT, "plausible")),  # longer than the default --context 4096
    flags("infer", ("--targets", ",", REFUSE, "empty target list")),
    flags("infer", ("--adapters", DIGITS_5000, REFUSE, "beyond any physical bound")),
    flags("infer", ("--context", "131072", ACCEPT, "plausible"), ("--batch", "64", ACCEPT, "plausible"), json=True),
]


@fuzz(0.07)
@always(INFER_CASES_NAMED)
@given(flag_cases("infer"))
def test_infer_flags(case):
    check_example("infer-flags", case.tag, case.build)


# ==== JSON values in files (config.json, records, baselines, calibration) =====================================
RAW_JSON = {  # a JSON value as it is written into the file, by what it is
    "NaN literal": "NaN",
    "Infinity literal": "Infinity",
    "-Infinity literal": "-Infinity",
    "1e999": "1e999",
    "5000-digit integer": DIGITS_5000,
    "10**20": str(10**20),
    "zero": "0",
    "negative": "-1",
    "string": '"abc"',
    "digit string": '"4096"',
    "empty string": '""',
    "list": "[8]",
    "object": '{"v": 8}',
    "null": "null",
    "true": "true",
    "fraction": "2.5",
    "integral float": "8.0",
    "100,000 nested lists": "[" * 100_000 + "]" * 100_000,
}
# not JSON at all, or beyond what any field could mean: refused wherever they stand; the message may name the
# file instead of the field
FILE_LEVEL = {"NaN literal", "Infinity literal", "-Infinity literal", "5000-digit integer", "100,000 nested lists"}
PARSE_TIME = FILE_LEVEL | {"1e999"}  # may be refused while parsing, naming the file (and line) only

# field category -> kinds of value the tool may accept there (EITHER); every other kind must be refused
TOLERATED = {
    "size": {"integral float"},  # a required positive integer (hidden_size, a settings batch)
    "optional size": {"integral float", "null"},  # num_key_value_heads, head_dim: null means the default
    "bytes": {"integral float", "null", "zero"},  # a measured byte count: may be missing or zero
    "rate": {"integral float", "null", "zero", "fraction", "10**20"},  # tokens/s, seconds
    "positive number": {"integral float", "fraction", "10**20"},  # LoRA alpha
    "probability": {"zero"},  # LoRA dropout, in [0, 1)
    "optional text": {"string", "digit string", "empty string", "null"},  # a GPU name
    "fraction": {"integral float", "null", "zero", "fraction", "10**20"},  # tolerances, margins, coefficients
    "free text": {"string", "digit string"},  # an id, a model name
    "enum": set(),  # method, optimizer, kind: none of these kinds is a member
    "object": {"object"},
    "strict bool": {"true"},  # settings booleans in a record
    "config flag": set(RAW_JSON) - FILE_LEVEL,  # tie_word_embeddings: transformers takes any truthy value
    "ignored": set(RAW_JSON) - FILE_LEVEL,  # fields the tool does not read
}


def json_value_verdict(category: str, kind: str) -> str:
    return EITHER if kind in TOLERATED[category] else REFUSE


@dataclass(frozen=True)
class Edit:
    """Set (raw JSON text) or drop one field of a JSON document, at a path of keys."""

    path: tuple[str, ...]
    kind: str  # a RAW_JSON key, or "drop", or "number x FACTOR"
    verdict: str
    raw: str = ""

    def __repr__(self) -> str:
        return f"Edit({'.'.join(self.path)} <- {self.kind}, {self.verdict})"

    def apply(self, doc: dict, raws: dict[str, str]) -> bool:
        """Change doc in place; False if the path is not there (nothing changed)."""
        *parents, last = self.path
        for key in parents:
            doc = doc.get(key) if isinstance(doc, dict) else None
        if not isinstance(doc, dict) or (self.kind == "drop" and last not in doc):
            return False
        if self.kind == "drop":
            del doc[last]
        elif self.kind.startswith("number x"):
            if not isinstance(doc.get(last), (int, float)) or isinstance(doc.get(last), bool):
                return False
            doc[last] = type(doc[last])(doc[last] * float(self.kind.split("x")[1]))
        else:
            marker = f"{PLACEHOLDER}{len(raws)}"
            raws[json.dumps(marker)] = self.raw
            doc[last] = marker
        return True

    def part(self, names: tuple[str, ...]) -> Part:
        return Part(repr(self), self.verdict, names)


def dumps_raw(doc, raws: dict[str, str], **kw) -> str:
    text = json.dumps(doc, **kw)
    for marker, raw in raws.items():
        text = text.replace(marker, raw)
    return text


def apply_edits(doc: dict, edits, part_for) -> tuple[dict[str, str], list[Part]]:
    """Apply edits in order; an edit at or above an earlier one's path replaces it (and its expectation)."""
    raws, applied = {}, []
    for e in edits:
        if e.apply(doc, raws):
            applied = [(path, part) for path, part in applied if path[: len(e.path)] != e.path]
            applied.append((e.path, part_for(e)))
    return raws, [part for _, part in applied]


def set_edits(path: tuple[str, ...], category: str) -> st.SearchStrategy[Edit]:
    return st.sampled_from(sorted(RAW_JSON)).map(
        lambda kind: Edit(path, kind, json_value_verdict(category, kind), RAW_JSON[kind])
    )


def field_names(edit: Edit, file_names: tuple[str, ...]) -> tuple[str, ...]:
    """What a refusal of this edit must name: the field (or the object holding it), or for values refused while
    parsing, the file."""
    names = tuple(edit.path[-2:])
    return names + file_names if edit.kind in PARSE_TIME else names


def with_non_ascii(doc: dict, path: tuple[str, ...], text: str) -> dict:
    doc = copy.deepcopy(doc)
    target = doc
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = text
    return doc


WHOLE_FILE_KINDS = [
    *("top-level list", "top-level number", "top-level string", "top-level null", "empty file", "whitespace only"),
    *("truncated", "binary garbage", "trailing garbage", "comment line", "100,000 nested lists"),
    *("UTF-16 with BOM", "UTF-16-LE without BOM", "UTF-8 with BOM", "latin-1 non-ASCII"),  # odd: 0 or 2
    *("UTF-8 non-ASCII", "CRLF line endings"),  # valid
]


def whole_json_file(kind: str, doc: dict, non_ascii_path: tuple[str, ...], cut=0.5, garbage=b"\xff\xfe\x00") -> tuple:
    """(what it is, the file's bytes, verdict) for a JSON file that is broken, or odd, as a whole."""
    text = json.dumps(doc, indent=2)
    wide = json.dumps(with_non_ascii(doc, non_ascii_path, "Modèle-ß-日本"), indent=2, ensure_ascii=False)
    latin = json.dumps(with_non_ascii(doc, non_ascii_path, "Modèle-ß"), indent=2, ensure_ascii=False)
    content = {
        "top-level list": lambda: f"[{text}]".encode(),
        "top-level number": lambda: b"42",
        "top-level string": lambda: b'"config"',
        "top-level null": lambda: b"null",
        "empty file": lambda: b"",
        "whitespace only": lambda: b" \n\t\n",
        "truncated": lambda: text[: max(1, min(len(text) - 1, int(len(text) * cut)))].encode(),
        "binary garbage": lambda: garbage,
        "trailing garbage": lambda: (text + "\n}").encode(),
        "comment line": lambda: ("// written by hand\n" + text).encode(),
        "100,000 nested lists": lambda: ("[" * 100_000 + "]" * 100_000).encode(),
        "UTF-16 with BOM": lambda: wide.encode("utf-16"),
        "UTF-16-LE without BOM": lambda: wide.encode("utf-16-le"),
        "UTF-8 with BOM": lambda: b"\xef\xbb\xbf" + text.encode(),
        "latin-1 non-ASCII": lambda: latin.encode("latin-1"),
        "UTF-8 non-ASCII": lambda: wide.encode(),
        "CRLF line endings": lambda: text.replace("\n", "\r\n").encode(),
    }[kind]()
    odd = ("UTF-16 with BOM", "UTF-16-LE without BOM", "UTF-8 with BOM", "latin-1 non-ASCII")
    verdict = EITHER if kind in odd else ACCEPT if kind in ("UTF-8 non-ASCII", "CRLF line endings") else REFUSE
    return kind, content, verdict


def whole_json_files(doc: dict, non_ascii_path: tuple[str, ...]) -> st.SearchStrategy[tuple]:
    return st.builds(
        whole_json_file,
        st.sampled_from(WHOLE_FILE_KINDS),
        st.just(doc),
        st.just(non_ascii_path),
        st.floats(0.0, 1.0),
        st.binary(min_size=1, max_size=64),
    )


def describe_bytes(data: bytes) -> str:
    return f"{len(data)} bytes: {short(repr(data[:120]), 100)}"


@dataclass(frozen=True)
class JsonFileCase:
    """A JSON input file: a valid document with field edits, or a broken whole file, or an odd path."""

    edits: tuple[Edit, ...] = ()
    whole: tuple[str, bytes, str] | None = None  # (what, bytes, verdict)
    odd_path: str | None = None  # an ODD_ENTRIES kind standing where the file should be

    def __repr__(self) -> str:
        what = self.odd_path or (self.whole and f"{self.whole[0]} ({len(self.whole[1])} bytes)") or self.edits
        return f"JsonFileCase({what})"

    @property
    def tag(self) -> str:
        if self.odd_path or self.whole:
            return self.odd_path or self.whole[0]
        return "+".join(f"{'.'.join(e.path[-1:])}:{e.kind}" for e in self.edits) or "valid"

    def write(self, path: Path, doc: dict, file_names: tuple[str, ...], names_for=field_names) -> list[Part]:
        """Write the file at `path`; returns the parts it varied."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.odd_path == "folder-without-config":
            return [Part(f"{path.parent.name}: a folder without {path.name}", REFUSE, (path.parent.name, path.name))]
        if self.odd_path:
            write_odd_entry(path, self.odd_path)
            return [Part(f"{path.name} is {self.odd_path}", REFUSE, file_names)]
        if self.whole:
            what, content, verdict = self.whole
            path.write_bytes(content)
            return [Part(f"{path.name}: {what}", verdict, file_names)]
        doc = copy.deepcopy(doc)
        raws, parts = apply_edits(doc, self.edits, lambda e: e.part(names_for(e, file_names)))
        path.write_text(dumps_raw(doc, raws, indent=2) + "\n")
        return parts or [Part(f"{path.name}: valid", ACCEPT)]


def json_file_cases(doc: dict, edits: st.SearchStrategy[Edit], non_ascii_path: tuple[str, ...], odd=ODD_ENTRIES):
    return st.one_of(
        edits.map(lambda e: JsonFileCase(edits=(e,))),
        st.lists(edits, min_size=0, max_size=3).map(lambda es: JsonFileCase(edits=tuple(es))),
        whole_json_files(doc, non_ascii_path).map(lambda w: JsonFileCase(whole=w)),
        st.sampled_from(odd).map(lambda kind: JsonFileCase(odd_path=kind)),
    )


# ==== b. config.json files ======================================================================================
CONFIG_FIELDS = {  # config.json field -> category of value it holds
    "hidden_size": "size",
    "intermediate_size": "size",
    "num_hidden_layers": "size",
    "num_attention_heads": "size",
    "vocab_size": "size",
    "num_key_value_heads": "optional size",
    "head_dim": "optional size",
    "model_type": "free text",  # a type outside the families is planned as a Llama-like decoder (with a note)
    "tie_word_embeddings": "config flag",
    "attention_bias": "config flag",
    "max_position_embeddings": "ignored",  # only a note depends on it: anything but a crash will do
    "rope_theta": "ignored",
    "rms_norm_eps": "ignored",
    "hidden_act": "ignored",
    "architectures": "ignored",
    "unknown_extra_field": "ignored",
}
REQUIRED_CONFIG_FIELDS = ("model_type",)  # transformers has a default for every size field (plan may use it)


def config_edits(profile: dict) -> st.SearchStrategy[Edit]:
    cfg = profile["config"]
    heads = cfg["num_attention_heads"]
    bad_kv = [k for k in (3, 5, 7, heads + 1, heads * 2) if heads % k]
    edits = [
        st.sampled_from(sorted(CONFIG_FIELDS)).flatmap(lambda f: set_edits((f,), CONFIG_FIELDS[f])),
        st.sampled_from(sorted(cfg)).map(
            lambda f: Edit((f,), "drop", REFUSE if f in REQUIRED_CONFIG_FIELDS else EITHER)
        ),
        st.sampled_from(bad_kv).map(lambda k: Edit(("num_key_value_heads",), f"{k}: not a divisor", REFUSE, str(k))),
        # outside the families: planned generically from the standard fields (a MoE config is refused); empty: refused
        st.sampled_from(["gpt2", "LLAMA", "bert", ""]).map(
            lambda t: Edit(("model_type",), f"outside the families {t!r}", EITHER if t else REFUSE, json.dumps(t))
        ),
    ]
    if cfg["model_type"] == "mixtral":
        n = cfg["num_local_experts"]
        edits += [
            st.integers(n + 1, 4 * n).map(
                lambda k: Edit(("num_experts_per_tok",), f"{k} > {n} experts", REFUSE, str(k))
            ),
            st.integers(1, n).map(lambda k: Edit(("num_experts_per_tok",), f"{k} of {n} experts", ACCEPT, str(k))),
            st.sampled_from(["num_local_experts", "num_experts_per_tok"]).flatmap(
                lambda f: set_edits((f,), "optional size")
            ),
        ]
    return st.one_of(*edits)


def config_field_names(edit: Edit, file_names: tuple[str, ...]) -> tuple[str, ...]:
    names = field_names(edit, file_names)
    return names + ("num_local_experts",) if edit.path[-1] == "num_experts_per_tok" else names


@dataclass(frozen=True)
class ConfigCase:
    profile: str
    file: JsonFileCase
    pass_folder: bool  # --model FOLDER instead of FOLDER/config.json
    command: str
    json: bool

    @property
    def tag(self) -> str:
        return self.file.tag

    def build(self, tmp: Path) -> Invocation:
        folder = tmp / "fuzzmodel"
        path = folder / "config.json"
        parts = self.file.write(
            path, model_profiles()[self.profile]["config"], ("config.json", "fuzzmodel"), config_field_names
        )
        target = folder if self.pass_folder else path
        argv = [self.command, "--model", str(target), "--gpu", "24gb"] + (["--json"] if self.json else [])
        shown = self.file.whole and describe_bytes(self.file.whole[1])
        return Invocation(argv, parts, files={"fuzzmodel/config.json": shown or repr(self.file)})


@st.composite
def config_cases(draw) -> ConfigCase:
    profile = draw(st.sampled_from(sorted(model_profiles())))
    cfg = model_profiles()[profile]["config"]
    file = draw(
        st.one_of(
            json_file_cases(cfg, config_edits(model_profiles()[profile]), ("_name_or_path",)),
            st.just(JsonFileCase(odd_path="folder-without-config")),
        )
    )
    return ConfigCase(
        profile, file, draw(st.booleans()), draw(st.sampled_from(["plan"] * 4 + ["infer"])), draw(st.booleans())
    )


def config_case(profile: str, file: JsonFileCase, json=False) -> ConfigCase:
    return ConfigCase(profile, file, False, "plan", json)


def config_edit(field: str, kind: str, verdict: str = REFUSE, profile="llama-3.1-8b") -> ConfigCase:
    raw = RAW_JSON.get(kind, kind)
    return config_case(profile, JsonFileCase(edits=(Edit((field,), kind, verdict, raw),)), json=True)


def config_whole(kind: str) -> ConfigCase:
    cfg = model_profiles()["llama-3.1-8b"]["config"]
    return config_case("llama-3.1-8b", JsonFileCase(whole=whole_json_file(kind, cfg, ("_name_or_path",))))


CONFIG_CASES_NAMED = [
    config_case("llama-3.1-8b", JsonFileCase(), json=True),
    config_edit("num_key_value_heads", "zero"),
    config_edit("num_key_value_heads", "true"),
    config_edit("head_dim", "zero"),
    config_edit("head_dim", "digit string"),
    config_edit("num_experts_per_tok", "9", profile="mixtral-8x7b"),
    config_edit("hidden_size", "NaN literal"),
    config_edit("hidden_size", "string"),
    config_edit("hidden_size", "1e999"),
    config_edit("intermediate_size", "negative"),
    config_edit("num_hidden_layers", "null"),
    config_edit("vocab_size", "5000-digit integer"),
    config_edit("vocab_size", "10**20"),
    config_edit("rope_theta", "NaN literal"),
    config_edit("max_position_embeddings", "string", EITHER),
    config_case("llama-3.1-8b", JsonFileCase(edits=(Edit(("model_type",), "drop", REFUSE),))),
    *(config_whole(kind) for kind in WHOLE_FILE_KINDS),
    *(config_case("llama-3.1-8b", JsonFileCase(odd_path=kind)) for kind in (*ODD_ENTRIES, "folder-without-config")),
]


@fuzz(0.2)
@always(CONFIG_CASES_NAMED)
@given(config_cases())
def test_config_files(case):
    check_example("config-json", case.tag, case.build)


# ==== c. result files ===========================================================================================
@cache
def committed_records() -> list[dict]:
    lines = (REPO / "results" / "h100" / "hf-stack-shared.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


RECORD_FIELDS = {  # path in a record -> category
    **{
        ("measured", f): "bytes"
        for f in (
            "peak_allocated_bytes",
            "peak_reserved_bytes",
            "peak_device_bytes",
            "nvml_used_baseline_bytes",
            "nvml_peak_used_bytes",
            "optimizer_state_bytes",
            "optimizer_state_paged_bytes",
        )
    },
    ("measured", "mem_after_load", "allocated"): "bytes",
    ("measured", "mem_after_train", "allocated"): "bytes",
    ("measured", "tokens_per_sec"): "rate",
    ("measured", "step_seconds_median"): "rate",
    ("measured",): "object",
    ("settings",): "object",
    ("id",): "free text",
    ("model",): "free text",
    ("kind",): "enum",
    ("outcome",): "enum",
    ("environment", "gpu_name"): "optional text",
    ("environment", "nvml_total_bytes"): "bytes",
    **{("settings", f): "size" for f in ("batch", "seq", "grad_accum", "rank")},
    **{("settings", f): "enum" for f in ("method", "optimizer", "attn", "quant", "compute_dtype")},
    ("settings", "targets"): "ignored",  # adapters' targets: checked against the model, not in a record
    **{("settings", f): "strict bool" for f in ("gradient_checkpointing", "double_quant", "upcast_non_quantized")},
    ("settings", "alpha"): "positive number",
    ("settings", "dropout"): "probability",
}
REQUIRED_RECORD_FIELDS = ("schema", "kind", "id", "model", "settings", "outcome", "measured")


def record_edits() -> st.SearchStrategy[Edit]:
    return st.one_of(
        st.sampled_from(sorted(RECORD_FIELDS)).flatmap(lambda p: set_edits(p, RECORD_FIELDS[p])),
        st.sampled_from([*REQUIRED_RECORD_FIELDS, "environment", "provenance", "architecture"]).map(
            lambda f: Edit((f,), "drop", REFUSE if f in REQUIRED_RECORD_FIELDS else EITHER)
        ),
        st.sampled_from(["99", "2", "0", '"1"', "null", "true", "[1]"]).map(
            lambda raw: Edit(("schema",), f"schema {raw}", REFUSE, raw)
        ),
        st.sampled_from(['"trian"', '""', "5", "null"]).map(lambda raw: Edit(("kind",), f"kind {raw}", REFUSE, raw)),
        st.sampled_from(['"banana"', "5", "null"]).map(lambda raw: Edit(("outcome",), f"outcome {raw}", REFUSE, raw)),
        st.sampled_from(
            [
                (("settings", "alpha"), "-1"),
                (("settings", "dropout"), "1.5"),
                (("settings", "batch"), "0"),
                (("settings", "lr"), "0.0001"),
                (("settings", "method"), '"QLoRA4"'),
                (("settings", "quant"), '"fp4"'),  # fine for qlora records, refused for lora / full ones
            ]
        ).map(lambda pr: Edit(pr[0], f"bad setting {pr[1]}", REFUSE, pr[1])),
        st.sampled_from([0.5, 0.9, 1.1, 2.0]).flatmap(
            lambda k: st.sampled_from(["peak_allocated_bytes", "tokens_per_sec"]).map(
                lambda f: Edit(("measured", f), f"number x{k}", EITHER)
            )
        ),
    )


LORA_SETTINGS = ("alpha", "dropout", "rank", "targets")


def record_edit_part(edit: Edit, method: str | None, file_names: tuple[str, ...]) -> Part:
    """A record edit's expectation, given the record's method: a full fine-tuning record does not use its LoRA
    settings, and fp4 is a QLoRA storage type."""
    gpu = ("gpu",) if edit.path[0] == "environment" else ()  # "records of exactly one GPU model, got none"
    part = edit.part(field_names(edit, file_names) + gpu)
    if edit.path[:1] == ("settings",) and edit.kind not in FILE_LEVEL:
        if method == "full" and edit.path[-1] in LORA_SETTINGS and part.verdict == REFUSE:
            return Part(part.label, EITHER, part.names)
        if edit.path[-1] == "quant" and edit.raw == '"fp4"':
            return Part(part.label, ACCEPT if method == "qlora" else REFUSE, part.names)
    return part


GARBAGE_LINES = ["#$%garbage", "}{", "not json at all", "\x00\x01\x02", "'single': 'quotes'", "<html>", "1 2 3"]
NON_OBJECT_LINES = ["[1, 2]", '"text"', "42", "null", "true", "[]"]


@dataclass(frozen=True)
class LineEdit:
    """A line of a .jsonl file that is not a record: where it goes, and whether it ends with a newline."""

    kind: str  # garbage | non-object | torn | blank lines | CRLF | BOM | latin-1 byte
    text: str
    at_end: bool
    newline: bool

    def __repr__(self) -> str:
        return (
            f"LineEdit({self.kind} {short(self.text, 30)!r} {'last' if self.at_end else 'inside'}, nl={self.newline})"
        )

    @property
    def verdict(self) -> str:
        if self.kind == "torn":
            return EITHER if self.at_end and not self.newline else REFUSE
        return REFUSE if self.kind in ("garbage", "non-object") else EITHER


@st.composite
def line_edits(draw) -> LineEdit:
    kind = draw(st.sampled_from(["garbage", "non-object", "torn", "blank lines", "CRLF", "BOM", "latin-1 byte"]))
    if kind == "garbage":
        text = draw(
            st.one_of(
                st.sampled_from(GARBAGE_LINES),
                random_text.map(lambda t: "#" + "".join(" " if not c.isprintable() else c for c in t)),
            )
        )
    elif kind == "non-object":
        text = draw(st.sampled_from(NON_OBJECT_LINES))
    elif kind == "torn":
        whole = json.dumps(draw(st.sampled_from(committed_records())), sort_keys=True)
        text = whole[: draw(st.integers(1, len(whole) - 1))]
    else:
        text = ""
    at_end = draw(st.booleans()) if kind in ("garbage", "non-object", "torn") else True
    newline = draw(st.booleans()) if at_end else True
    return LineEdit(kind, text, at_end, newline)


RESULTS_FILE = "fuzz-results.jsonl"


@dataclass(frozen=True)
class ResultsFile:
    """Committed records (a selection), edited, with an odd line and an odd entry next to the file."""

    records: tuple[int, ...]
    edits: tuple[tuple[int, Edit], ...]  # (which record, edit)
    line: LineEdit | None
    folder_entry: str | None  # an ODD_ENTRIES kind named x.jsonl next to the file (the folder is passed)

    @property
    def tag(self) -> str:
        what = [self.folder_entry and f"folder:{self.folder_entry}", self.line and f"line:{self.line.kind}"]
        what += [f"{'.'.join(e.path)}:{e.kind}" for _, e in self.edits if self.records]
        return "+".join(w for w in what if w) or "valid"

    def write(self, store: Path) -> tuple[Path, list[Part], dict[str, str]]:
        store.mkdir()
        path = store / RESULTS_FILE
        names = (RESULTS_FILE,)
        docs = [copy.deepcopy(committed_records()[i]) for i in self.records]
        lines, parts = [], []
        for n, doc in enumerate(docs):
            mine = [edit for i, edit in self.edits if i % len(docs) == n]
            method = (doc.get("settings") or {}).get("method")
            raws, record_parts = apply_edits(doc, mine, lambda e, m=method: record_edit_part(e, m, names))
            parts += record_parts
            lines.append(dumps_raw(doc, raws, sort_keys=True))
        text = "".join(line + "\n" for line in lines)
        if self.line:
            text = self._with_line(text, lines)
            parts.append(Part(repr(self.line), self.line.verdict, names))
        data = text.encode("utf-8")
        if self.line and self.line.kind == "latin-1 byte":
            data = data.replace(b'"model": "', b'"model": "caf\xe9-', 1)
        path.write_bytes(data)
        if self.folder_entry:
            what = write_odd_entry(store / "x.jsonl", self.folder_entry)
            parts.append(Part(f"x.jsonl in the folder is {what}", EITHER, ("x.jsonl",)))
        files = {
            RESULTS_FILE: f"{len(self.records)} committed records; edits {[e for _, e in self.edits]}; {self.line}"
        }
        return (store if self.folder_entry else path), parts, files

    def _with_line(self, text: str, lines: list[str]) -> str:
        e = self.line
        if e.kind == "blank lines":
            return text.replace("\n", "\n\n  \n")
        if e.kind == "CRLF":
            return text.replace("\n", "\r\n")
        if e.kind == "BOM":
            return "\ufeff" + text
        if e.kind == "latin-1 byte":
            return text
        if e.at_end:
            return text + e.text + ("\n" if e.newline else "")
        middle = len(lines) // 2
        return "".join(x + "\n" for x in lines[:middle] + [e.text] + lines[middle:])


@st.composite
def results_files(draw) -> ResultsFile:
    n = len(committed_records())
    records = draw(st.one_of(st.just(tuple(range(n))), st.lists(st.integers(0, n - 1), max_size=n).map(tuple)))
    what = draw(st.sampled_from(["a record edit"] * 3 + ["a line", "a folder entry", "several", "nothing"]))
    edit = st.tuples(st.integers(0, n - 1), record_edits())
    if what == "several":
        edits = draw(st.lists(edit, max_size=2))
        line, entry = draw(st.none() | line_edits()), draw(st.none() | st.sampled_from(ODD_ENTRIES))
        return ResultsFile(records, tuple(edits), line, entry)
    return ResultsFile(
        records,
        (draw(edit),) if what == "a record edit" else (),
        draw(line_edits()) if what == "a line" else None,
        draw(st.sampled_from(ODD_ENTRIES)) if what == "a folder entry" else None,
    )


@cache
def valid_baseline_text() -> str:
    """`baseline update results/h100 --out B --allow-dirty`, once (git read-only: no index refresh)."""
    with example_dir() as tmp, mock.patch.dict(os.environ, {"GIT_OPTIONAL_LOCKS": "0"}):
        out = run_cli(["baseline", "update", str(REPO / "results" / "h100"), "--out", "b.json", "--allow-dirty"], tmp)
        if out.status != 0 or not (tmp / "b.json").is_file():
            pytest.skip(f"cannot build a baseline to mutate: status {out.status}, {out.stderr[-300:]}")
        return (tmp / "b.json").read_text()


@dataclass(frozen=True)
class ResultsCase:
    command: str  # validate | results | compare | calibrate
    file: ResultsFile
    json: bool
    allow_missing: bool

    @property
    def tag(self) -> str:
        return f"{self.command}:{self.file.tag}"

    @property
    def hang_key(self) -> str:
        return f"folder:{self.file.folder_entry}" if self.file.folder_entry else self.tag

    def build(self, tmp: Path) -> Invocation:
        target, parts, files = self.file.write(tmp / "store")
        everything = len(self.file.records) == len(committed_records())
        subset_may_be_refused = not self.file.records or (self.command == "calibrate" and not everything)
        selection = EITHER if subset_may_be_refused else ACCEPT  # e.g. calibrate: every record held out
        blame = (RESULTS_FILE, "record", "store") if selection == EITHER else ()  # e.g. "no GPU records in ..."
        parts.append(Part(f"{len(self.file.records)} records", selection, blame))
        inv = Invocation([self.command, str(target)], parts, files)
        if self.command == "compare":
            baseline = tmp / "baseline.json"
            baseline.write_text(valid_baseline_text())
            inv.argv.append(str(baseline))
            inv.argv += ["--allow-missing"] if self.allow_missing else []
            inv.regression_possible = True
        if self.command == "calibrate":
            inv.out_file = tmp / "cal-out.json"
            inv.argv += ["--out", str(inv.out_file)]
        if self.json and self.command in ("validate", "results", "compare"):
            inv.argv.append("--json")
        if self.file.line and self.file.line.kind == "torn" and self.file.line.verdict == EITHER:
            inv.torn_tail = (RESULTS_FILE,)
        return inv


def results_cases(file: ResultsFile) -> list[ResultsCase]:
    return [ResultsCase(command, file, command != "calibrate", False) for command in RESULT_COMMANDS]


def record_edit(path: tuple[str, ...], kind: str, raw: str) -> ResultsFile:
    return ResultsFile(ALL_RECORDS, ((0, Edit(path, kind, REFUSE, raw)),), None, None)


def odd_line(kind: str, text: str, at_end=True, newline=True, records=None) -> ResultsFile:
    return ResultsFile(ALL_RECORDS if records is None else records, (), LineEdit(kind, text, at_end, newline), None)


RESULT_COMMANDS = ("validate", "results", "compare", "calibrate")
ALL_RECORDS = tuple(range(len(committed_records())))
TORN = json.dumps(committed_records()[0], sort_keys=True)[:200]
RESULTS_CASES_NAMED = [
    case
    for file in [
        ResultsFile(ALL_RECORDS, (), None, None),
        record_edit(("measured", "tokens_per_sec"), "string", '"fast"'),
        record_edit(("measured", "peak_allocated_bytes"), "negative", "-1"),
        record_edit(("measured", "peak_device_bytes"), "NaN literal", "NaN"),
        record_edit(("measured", "nvml_used_baseline_bytes"), "negative", "-503316480"),
        record_edit(("schema",), "schema 99", "99"),
        record_edit(("kind",), "unknown kind", '"trian"'),
        record_edit(("settings", "batch"), "bad setting 0", "0"),
        record_edit(("settings", "method"), "bad setting", '"QLoRA4"'),
        ResultsFile(ALL_RECORDS, ((0, Edit(("measured",), "drop", REFUSE)),), None, None),
        odd_line("non-object", "[1, 2]", at_end=False),
        odd_line("garbage", "#$%garbage", newline=True),
        odd_line("garbage", "#$%garbage", newline=False),
        odd_line("torn", TORN, newline=False),
        odd_line("torn", TORN, newline=True),
        odd_line("garbage", "#$%garbage", records=()),
        *(ResultsFile(ALL_RECORDS, (), None, entry) for entry in ODD_ENTRIES),
    ]
    for case in results_cases(file)
]


@fuzz(0.18)
@always(RESULTS_CASES_NAMED)
@given(
    st.builds(
        ResultsCase,
        st.sampled_from(["validate", "results", "compare", "calibrate"]),
        results_files(),
        st.booleans(),
        st.booleans(),
    )
)
def test_result_files(case):
    check_example("results", case.tag, case.build, hang_key=case.hang_key)


# ==== d. baselines ===============================================================================================
def baseline_doc() -> dict:
    return json.loads(valid_baseline_text())


def baseline_edits(doc: dict) -> st.SearchStrategy[Edit]:
    keys = sorted(doc["configs"])
    metric = st.sampled_from(["peak_allocated_bytes", "peak_reserved_bytes", "peak_device_bytes"])
    return st.one_of(
        st.sampled_from(["99", "2", '"1"', "null", "0", "true"]).map(
            lambda r: Edit(("schema",), f"schema {r}", REFUSE, r)
        ),
        st.sampled_from(["5", "null", "[]", '"NVIDIA A100-SXM4-80GB"']).map(
            lambda r: Edit(("gpu",), f"gpu {r}", REFUSE, r)
        ),
        st.sampled_from(["[]", '"x"', "null", "5"]).map(lambda r: Edit(("configs",), f"configs {r}", REFUSE, r)),
        st.just(Edit(("configs",), "configs {}", EITHER, "{}")),
        st.sampled_from(["schema", "gpu", "configs"]).map(lambda f: Edit((f,), "drop", REFUSE)),
        st.sampled_from(["versions", "driver", "provenance"]).map(lambda f: Edit((f,), "drop", EITHER)),
        st.sampled_from(['"x"', "[]", "5"]).map(lambda r: Edit(("versions",), f"versions {r}", REFUSE, r)),
        st.tuples(st.sampled_from(keys), st.sampled_from(['"x"', "[]", "null", "5"])).map(
            lambda kr: Edit(("configs", kr[0]), f"config entry {kr[1]}", REFUSE, kr[1])
        ),
        st.tuples(st.sampled_from(keys), metric).flatmap(lambda km: set_edits(("configs", *km), "bytes")),
        st.sampled_from(keys).flatmap(lambda k: set_edits(("configs", k, "tokens_per_sec"), "rate")),
        st.sampled_from(keys).flatmap(lambda k: set_edits(("configs", k, "tokens_per_sec_spread"), "fraction")),
        st.tuples(st.sampled_from(keys), metric, st.sampled_from([0.5, 0.9, 0.99, 1.01, 1.1, 2.0])).map(
            lambda kmf: Edit(("configs", kmf[0], kmf[1]), f"number x{kmf[2]}", ACCEPT)
        ),
        st.sampled_from(keys).map(lambda k: Edit(("configs", k, "outcome"), "outcome oom", ACCEPT, '"oom"')),
    )


def tolerance_values() -> st.SearchStrategy[Value]:
    return st.sampled_from(
        values(ACCEPT, "plausible", "0", "0.02", "0.05", "0.1", "0.5")
        + values(EITHER, "odd", "5%", "1", "10", " 0.02 ", "1e-3")
        + values(REFUSE, "negative", "-0.1", "-1")
        + unparseable_numbers()
    )


@dataclass(frozen=True)
class BaselineCase:
    file: JsonFileCase
    mutated_side: str  # baseline | new
    other_side: str  # results (results/h100) | baseline (the valid baseline)
    tolerances: tuple[tuple[str, Value], ...]
    json: bool
    allow_missing: bool

    @property
    def tag(self) -> str:
        return self.file.tag

    def build(self, tmp: Path) -> Invocation:
        mutated = tmp / "mutated-baseline.json"
        parts = self.file.write(mutated, baseline_doc(), ("mutated-baseline.json",), baseline_field_names)
        valid = tmp / "baseline.json"
        valid.write_text(valid_baseline_text())
        other = str(REPO / "results" / "h100") if self.other_side == "results" else str(valid)
        sides = [str(mutated), other] if self.mutated_side == "new" else [other, str(mutated)]
        argv = ["compare", *sides]
        for flag, value in self.tolerances:
            argv.append(f"{flag}={value.text}")
            parts.append(Part(f"{flag} {short(value.text, 30)!r} ({value.why})", value.verdict, FLAG_NAMES[flag]))
        argv += (["--json"] if self.json else []) + (["--allow-missing"] if self.allow_missing else [])
        return Invocation(argv, parts, files={mutated.name: repr(self.file)}, regression_possible=bool(self.file.edits))


def baseline_field_names(edit: Edit, file_names: tuple[str, ...]) -> tuple[str, ...]:
    names = field_names(edit, file_names)
    if len(edit.path) >= 2 and edit.path[0] == "configs":  # a config's key is its record id
        names += (edit.path[1],)
    return names


@st.composite
def baseline_cases(draw) -> BaselineCase:
    doc = baseline_doc()
    file = draw(json_file_cases(doc, baseline_edits(doc), ("provenance", "source")))
    flags = draw(st.lists(st.sampled_from(["--memory-tolerance", "--throughput-tolerance"]), max_size=2, unique=True))
    tolerances = tuple((f, draw(tolerance_values())) for f in flags)
    sides = draw(st.sampled_from(["baseline", "new"])), draw(st.sampled_from(["results", "baseline"]))
    return BaselineCase(file, *sides, tolerances, draw(st.booleans()), draw(st.booleans()))


def baseline_case(file: JsonFileCase = JsonFileCase(), *tolerances: tuple[str, str, str]) -> BaselineCase:
    tol = tuple((flag, Value(text, verdict, "named")) for flag, text, verdict in tolerances)
    return BaselineCase(file, "baseline", "results", tol, True, False)


def baseline_edit(path: tuple[str, ...], kind: str, raw: str = "", verdict=REFUSE) -> BaselineCase:
    return baseline_case(JsonFileCase(edits=(Edit(path, kind, verdict, raw),)))


A_CONFIG = "llama-3.1-8b/qlora/r16/nf4-dq/paged_adamw_8bit/bs1x2048/gc"
BASELINE_CASES_NAMED = [
    baseline_case(),
    baseline_edit(("schema",), "schema 99", "99"),
    baseline_edit(("configs", A_CONFIG, "peak_device_bytes"), "NaN literal", "NaN"),
    baseline_edit(("configs", A_CONFIG, "tokens_per_sec"), "string", '"fast"'),
    baseline_edit(("configs", A_CONFIG, "peak_allocated_bytes"), "negative", "-1"),
    baseline_edit(("configs",), "drop"),
    baseline_edit(("configs",), "configs []", "[]"),
    baseline_edit(("gpu",), "gpu 5", "5"),
    *(baseline_case(JsonFileCase(), ("--memory-tolerance", t, REFUSE)) for t in ("nan", "inf", "-0.1", "abc")),
    *(baseline_case(JsonFileCase(), ("--throughput-tolerance", t, REFUSE)) for t in ("nan", "inf", "-0.1", "abc")),
    baseline_case(JsonFileCase(odd_path="fifo")),
    baseline_case(JsonFileCase(whole=whole_json_file("top-level list", {"configs": {}}, ("x",)))),
]


@fuzz(0.1)
@always(BASELINE_CASES_NAMED)
@given(baseline_cases())
def test_baselines(case):
    check_example("baselines", case.tag, case.build)


# ==== e. calibration inputs ======================================================================================
@cache
def calibration_doc() -> dict:
    return json.loads((REPO / "qlora_bench" / "calibration.json").read_text())


REQUIRED_CALIBRATION = ("cuda_context_bytes", "bnb_runtime_bytes", "cublas_workspace_bytes", "driver_idle_bytes")


def calibration_edits() -> st.SearchStrategy[Edit]:
    doc = calibration_doc()
    gpu = sorted(doc.get("step_time", {}))[0]
    theta = sorted(doc["step_time"][gpu]["theta"])
    return st.one_of(
        st.sampled_from(REQUIRED_CALIBRATION).flatmap(lambda k: set_edits((k, "value"), "bytes")),
        st.sampled_from(["under", "over"]).flatmap(lambda k: set_edits(("reserved_rel_error", k), "fraction")),
        st.sampled_from(sorted(doc["safety_margin"])).flatmap(lambda k: set_edits(("safety_margin", k), "fraction")),
        set_edits(("allocated_rel_error", "max"), "fraction"),
        st.sampled_from(theta).flatmap(lambda k: set_edits(("step_time", gpu, "theta", k), "fraction")),
        st.just(Edit(("step_time", gpu, "theta", "e_mm"), "zero (infinitely fast)", REFUSE, "0")),
        st.sampled_from([*REQUIRED_CALIBRATION, "reserved_rel_error"]).map(lambda k: Edit((k,), "drop", REFUSE)),
        st.just(Edit(("reserved_rel_error", "under"), "drop", REFUSE)),
        st.sampled_from(["fitted_on", "held_out", "gpus", "source_files", "generated_by", "step_time"]).map(
            lambda k: Edit((k,), "drop", EITHER)
        ),
        st.sampled_from(REQUIRED_CALIBRATION).flatmap(
            lambda k: st.sampled_from(['"x"', "[]", "null", "-5"]).map(lambda r: Edit((k,), f"{k} {r}", REFUSE, r))
        ),
    )


@dataclass(frozen=True)
class CalibrationCase:
    file: JsonFileCase
    method: str
    json: bool

    @property
    def tag(self) -> str:
        return self.file.tag

    def build(self, tmp: Path) -> Invocation:
        path = tmp / "fuzz-calibration.json"
        parts = self.file.write(path, calibration_doc(), ("fuzz-calibration.json",))
        argv = ["plan", "--model", "8b", "--gpu", "24gb", "--method", self.method, "--calibration", str(path)]
        return Invocation(argv + (["--json"] if self.json else []), parts, files={path.name: repr(self.file)})


def calibration_case(*edits: Edit, whole: str | None = None, odd: str | None = None) -> CalibrationCase:
    w = whole and whole_json_file(whole, calibration_doc(), ("generated_by",))
    return CalibrationCase(JsonFileCase(edits=edits, whole=w, odd_path=odd), "qlora", True)


CALIBRATION_CASES_NAMED = [
    calibration_case(),
    calibration_case(Edit(("cuda_context_bytes", "value"), "negative", REFUSE, "-1")),
    calibration_case(Edit(("driver_idle_bytes", "value"), "NaN literal", REFUSE, "NaN")),
    calibration_case(Edit(("reserved_rel_error", "under"), "string", REFUSE, '"x"')),
    calibration_case(Edit(("safety_margin", "qlora"), "negative", REFUSE, "-0.5")),
    calibration_case(Edit(("step_time", "h100-sxm", "theta", "e_mm"), "zero (infinitely fast)", REFUSE, "0")),
    calibration_case(Edit(("cublas_workspace_bytes",), "drop", REFUSE)),
    calibration_case(whole="top-level list"),
    calibration_case(whole="empty file"),
    calibration_case(odd="fifo"),
]


@fuzz(0.07)
@always(CALIBRATION_CASES_NAMED)
@given(
    st.builds(
        CalibrationCase,
        json_file_cases(calibration_doc(), calibration_edits(), ("generated_by",)),
        st.sampled_from(["qlora", "lora", "full", "all"]),
        st.booleans(),
    )
)
def test_calibration_files(case):
    check_example("calibration", case.tag, case.build)


@dataclass(frozen=True)
class NegativeIdleCase:
    """Records given to `calibrate` where one has a negative idle-GPU baseline: refused, nothing written."""

    records: tuple[int, ...]
    which: int
    baseline_bytes: int
    json_edit: Edit | None

    @property
    def tag(self) -> str:
        return "negative nvml_used_baseline_bytes"

    def build(self, tmp: Path) -> Invocation:
        negative = Edit(("measured", "nvml_used_baseline_bytes"), "negative", REFUSE, str(self.baseline_bytes))
        edits = ((self.which, negative),) + (((self.which, self.json_edit),) if self.json_edit else ())
        target, parts, files = ResultsFile(self.records, edits, None, None).write(tmp / "store")
        out = tmp / "cal-out.json"
        return Invocation(["calibrate", str(target), "--out", str(out)], parts, files, out_file=out)


@fuzz(0.04)
@always([NegativeIdleCase(ALL_RECORDS, 0, -1, None), NegativeIdleCase((3,), 0, -(10**9), None)])
@given(
    st.builds(
        NegativeIdleCase,
        st.lists(st.integers(0, len(committed_records()) - 1), min_size=1, unique=True).map(tuple),
        st.integers(0, 100),
        st.integers(-(10**12), -1),
        st.none() | record_edits().filter(lambda e: e.path != ("measured", "nvml_used_baseline_bytes")[: len(e.path)]),
    )
)
def test_calibrate_refuses_negative_idle_baseline(case):
    check_example("calibrate-negative-idle", case.tag, case.build)


# ==== f. sweep files ==============================================================================================
@cache
def sweep_docs() -> dict[str, dict]:
    """The committed sweep files, with the tiny model's path made absolute (examples run in a temp folder)."""
    out = {}
    for name in ("cpu-smoke", "h100-standard"):
        doc = yaml.safe_load((REPO / "sweeps" / f"{name}.yaml").read_text())
        for entry in doc["grid"]:
            if str(entry.get("model", "")).startswith("tests/"):
                entry["model"] = str(REPO / entry["model"])
        out[name] = doc
    return out


COUNT_YAML = {  # raw YAML for a count field (batch, seq, rank, grad_accum) -> verdict
    "two": REFUSE, "[2, x]": REFUSE, "0": REFUSE, "-1": REFUSE, "2.5": REFUSE, ".nan": REFUSE, ".inf": REFUSE,
    "1.0e+400": REFUSE, str(10**30): REFUSE, "null": REFUSE, "true": REFUSE, "{a: 1}": REFUSE,
    # a grid value reads like the flag: "8" and 8k are token counts (sweep files and flags refuse the same values)
    '"8"': ACCEPT, "8k": ACCEPT, '"8 apples"': REFUSE, "[]": EITHER, "[1, 2]": ACCEPT, "[4, 4]": EITHER,
}  # fmt: skip
GRID_YAML = {  # grid field -> {raw YAML: verdict}
    **{f: COUNT_YAML for f in ("batch", "seq", "rank", "grad_accum")},
    "method": {"foo": REFUSE, "5": REFUSE, "null": REFUSE, "QLoRA": EITHER, "[qlora, lora]": ACCEPT, "[]": EITHER},
    "alpha": {"x": REFUSE, "-1": REFUSE, ".nan": REFUSE, "0": REFUSE, "16": ACCEPT, "0.5": ACCEPT},
    "dropout": {"1.5": REFUSE, "-0.1": REFUSE, ".nan": REFUSE, "x": REFUSE, "0": ACCEPT, "0.1": ACCEPT},
    "optimizer": {"adam": REFUSE, "5": REFUSE, "adamw_torch": ACCEPT},
    "attn": {"flash": REFUSE, "eager": ACCEPT},
    "compute_dtype": {"fp8": REFUSE, "fp16": ACCEPT},
    "quant": {"int4": REFUSE, "nf4": ACCEPT},
    **{
        f: {"maybe": REFUSE, "5": REFUSE, "null": REFUSE, "[true, false]": ACCEPT, "yes": ACCEPT}
        for f in ("double_quant", "gradient_checkpointing", "upcast_non_quantized")
    },
    "targets": {'""': REFUSE, '","': REFUSE, "5": REFUSE, "null": REFUSE, "attn": ACCEPT, "q_proj,v_proj": ACCEPT},
    "blocksize": {"63": REFUSE, '"64"': REFUSE, "128": ACCEPT},
    "model": {"null": REFUSE, "5": EITHER, "[]": EITHER, "{a: 1}": REFUSE, '""': REFUSE},
    **{f: {"0.0001": REFUSE} for f in ("lr", "learning_rate", "epochs", "Method")},  # unknown grid keys
}
TOP_LEVEL_YAML = {  # top-level key -> {raw YAML: verdict}
    "name": {"5": EITHER, "[a]": REFUSE, "{a: 1}": REFUSE, '""': EITHER, '"../../x"': EITHER, "null": EITHER},
    "timeout_s": {
        '"abc"': REFUSE, "-1": REFUSE, "0": REFUSE, ".nan": REFUSE, ".inf": REFUSE, "60": ACCEPT,
        '"300"': EITHER, "[1]": REFUSE, "null": EITHER,
    },
    "options": {
        "5": REFUSE, "[1]": REFUSE, "{steps: -1}": REFUSE, "{steps: x}": REFUSE, "{warmup: -1}": REFUSE,
        "{stepz: 3}": REFUSE, "{min_seconds: .nan}": REFUSE, "{trainer: foo}": REFUSE, "{seed: x}": REFUSE,
        "{steps: 3, warmup: 0}": ACCEPT, "null": EITHER,
    },
    "defaults": {"5": REFUSE, "{rank: x}": REFUSE, "{rank: 8}": ACCEPT, "{lr: 1}": REFUSE},
    "grid": {"null": REFUSE, '"x"': REFUSE, "5": REFUSE, "[]": EITHER, "[5]": REFUSE, "[null]": REFUSE},
    **{k: {"1": REFUSE} for k in ("foo", "timeout", "grids", "option")},  # unknown top-level keys
}  # fmt: skip
OPTION_NAMES = ("steps", "warmup", "stepz", "min_seconds", "trainer", "seed", "rank", "lr")
YAML_GARBAGE = [
    "key: [unclosed",
    "a: b: c",
    "grid:\n\t- model: x",
    "{{{",
    "- a\n- b",
    "42",
    "just a sentence",
    "~",
    "",
    "!!python/object/apply:os.system ['echo owned']",
    "[" * 100_000,
    "a: &a [1]\nb: *nosuchanchor",
]


@dataclass(frozen=True)
class SweepEdit:
    where: str  # grid | top | drop | huge grid | whole | odd path
    key: str
    raw: str
    verdict: str

    def __repr__(self) -> str:
        return f"SweepEdit({self.where} {self.key}: {short(self.raw, 40)!r}, {self.verdict})"


def sweep_edits() -> st.SearchStrategy[SweepEdit]:
    def from_table(where, table):
        return st.sampled_from([(k, raw, v) for k, d in table.items() for raw, v in d.items()]).map(
            lambda krv: SweepEdit(where, *krv)
        )

    return st.one_of(
        from_table("grid", GRID_YAML),
        from_table("top", TOP_LEVEL_YAML),
        st.sampled_from(["grid", "name", "timeout_s", "options"]).map(
            lambda k: SweepEdit("drop", k, "", REFUSE if k == "grid" else ACCEPT)
        ),
        st.integers(100, 400).map(lambda n: SweepEdit("huge grid", "seq,batch,rank,alpha", str(n), REFUSE)),
        st.integers(2, 5).map(lambda n: SweepEdit("moderate grid", "seq,batch,rank", str(n), ACCEPT)),
        st.sampled_from(YAML_GARBAGE).map(lambda t: SweepEdit("whole", "garbage", t, REFUSE)),
        st.sampled_from(["utf-16", "latin-1"]).map(lambda enc: SweepEdit("whole", "encoding", enc, EITHER)),
        st.binary(min_size=1, max_size=64).map(lambda b: SweepEdit("whole", "binary", b.hex(), REFUSE)),
        st.sampled_from(ODD_ENTRIES).map(lambda kind: SweepEdit("odd path", kind, "", REFUSE)),
    )


SWEEP_FILE = "fuzz-sweep.yaml"
PLACEHOLDER_YAML = "fuzz_placeholder_value"


@dataclass(frozen=True)
class SweepCase:
    base: str  # cpu-smoke | h100-standard
    edit: SweepEdit | None
    flags: tuple[tuple[str, Value], ...]

    @property
    def tag(self) -> str:
        e = self.edit
        return "valid" if e is None else f"{e.where}:{e.key}" if e.where != "whole" else f"whole:{short(e.raw, 20)}"

    def build(self, tmp: Path) -> Invocation:
        path = tmp / SWEEP_FILE
        if self.edit:
            parts = [self._write(path)]
        else:
            path.write_text(yaml.safe_dump(sweep_docs()[self.base], sort_keys=False))
            parts = [Part(f"{self.base}.yaml, unchanged", ACCEPT)]
        argv = ["sweep", str(path), "--dry-run"]
        for flag, value in self.flags:
            argv.append(f"{flag}={value.text}")
            parts.append(Part(f"{flag} {short(value.text, 30)!r}", value.verdict, value.names or FLAG_NAMES[flag]))
        return Invocation(argv, parts, files={SWEEP_FILE: repr(self.edit)})

    def _write(self, path: Path) -> Part:
        e, doc = self.edit, copy.deepcopy(sweep_docs()[self.base])
        names = (e.key, SWEEP_FILE) if e.where in ("whole", "odd path") else (e.key,)
        if e.where == "odd path":
            write_odd_entry(path, e.key)
            return Part(f"{SWEEP_FILE} is {e.key}", REFUSE, (SWEEP_FILE,))
        if e.where == "whole":
            path.write_bytes(self._whole_file(doc))
            return Part(repr(e), e.verdict, (SWEEP_FILE,))
        raw = e.raw
        if e.where == "grid":
            doc["grid"][0][e.key] = PLACEHOLDER_YAML
        elif e.where == "top":
            doc[e.key] = PLACEHOLDER_YAML
            names += OPTION_NAMES if e.key in ("options", "defaults") else ()
        elif e.where == "drop":
            doc.pop(e.key, None)
        else:  # a grid of n^4 (huge) or n^3 (moderate) configurations
            n = int(e.raw)
            doc["grid"] = [{"model": "llama-3.2-1b", **{k: list(range(1, n + 1)) for k in e.key.split(",")}}]
            names = ("grid", "configuration", SWEEP_FILE)
        text = yaml.safe_dump(doc, sort_keys=False).replace(PLACEHOLDER_YAML, raw)
        path.write_text(text)
        return Part(repr(e), e.verdict, names)

    def _whole_file(self, doc: dict) -> bytes:
        e = self.edit
        if e.key == "binary":
            return bytes.fromhex(e.raw)
        if e.key == "encoding":
            text = "# Modèle-ß sweep\n" + yaml.safe_dump(doc, sort_keys=False)
            return text.encode(e.raw)
        return e.raw.encode()


def sweep_flag_values() -> st.SearchStrategy[tuple[tuple[str, Value], ...]]:
    shard = st.sampled_from(
        values(ACCEPT, "valid", "1/2", "2/2", "1/1")
        + values(REFUSE, "invalid shard", "0/2", "3/2", "abc", "1/0", "-1/2", "1/" + DIGITS_5000, "", "1/2/3")
    )
    timeout = st.sampled_from(
        values(ACCEPT, "valid", "60", "1.5") + values(REFUSE, "invalid", "-1", "0") + unparseable_numbers()
    )
    return st.lists(st.sampled_from(["--shard", "--timeout"]), max_size=2, unique=True).flatmap(
        lambda flags: st.tuples(*[st.tuples(st.just(f), shard if f == "--shard" else timeout) for f in flags])
    )


def sweep_case(where: str, key: str, raw: str, verdict: str = REFUSE) -> SweepCase:
    return SweepCase("cpu-smoke", SweepEdit(where, key, raw, verdict), ())


def sweep_flag_case(flag: str, text: str) -> SweepCase:
    return SweepCase("cpu-smoke", None, ((flag, Value(text, REFUSE, "named")),))


SWEEP_CASES_NAMED = [
    SweepCase("cpu-smoke", None, ()),
    sweep_case("grid", "batch", "two"),
    sweep_case("grid", "seq", "[2, x]"),
    sweep_case("grid", "method", "5"),
    sweep_case("grid", "lr", "0.0001"),
    sweep_case("top", "foo", "1"),
    sweep_case("top", "grid", "null"),
    sweep_case("top", "timeout_s", '"abc"'),
    sweep_case("top", "options", "{steps: -1}"),
    sweep_case("huge grid", "seq,batch,rank,alpha", "200"),
    sweep_case("whole", "garbage", "key: [unclosed"),
    sweep_case("whole", "garbage", "- a\n- b"),
    sweep_case("whole", "encoding", "utf-16", EITHER),
    sweep_case("odd path", "fifo", ""),
    sweep_flag_case("--shard", "0/2"),
    sweep_flag_case("--timeout", "nan"),
]


@fuzz(0.08)
@always(SWEEP_CASES_NAMED)
@given(
    st.builds(
        SweepCase,
        st.sampled_from(["cpu-smoke"] * 3 + ["h100-standard"]),
        st.none() | sweep_edits(),
        sweep_flag_values(),
    )
)
def test_sweep_files(case):
    check_example("sweeps", case.tag, case.build)

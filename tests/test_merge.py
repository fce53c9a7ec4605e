"""The merge workflow end to end on a tiny model: train a QLoRA adapter on the 4-bit base, save it, load the base
in 16-bit, merge, save safetensors, reload; the merged logits equal base-plus-adapter logits within bf16
tolerance, and the merged model loads in a process where peft cannot be imported."""

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from qlora_bench.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    root = tmp_path_factory.mktemp("merge")
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type="llama", hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(root / "base")
    q = AutoModelForCausalLM.from_pretrained(
        root / "base", dtype=torch.bfloat16, device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16))
    q = peft.prepare_model_for_kbit_training(q, use_gradient_checkpointing=False)
    q = peft.get_peft_model(q, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in q.parameters() if p.requires_grad], lr=5e-3)
    x = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    for _ in range(10):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = q(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    q.save_pretrained(root / "adapter")
    return root, x


def test_merged_logits_equal_base_plus_adapter(trained):
    from transformers import AutoModelForCausalLM

    root, x = trained
    assert main(["merge", "--base", str(root / "base"), "--adapter", str(root / "adapter"),
                 "--out", str(root / "merged")]) == 0
    assert (root / "merged" / "model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.bfloat16)
    unmerged = peft.PeftModel.from_pretrained(base, root / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(root / "merged", dtype=torch.bfloat16).eval()
    plain = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        a = unmerged(input_ids=x).logits.float()
        b = merged(input_ids=x).logits.float()
        c = plain(input_ids=x).logits.float()
    assert (a - c).abs().max() > 1e-2  # the adapter learned something: merged must differ from the base
    scale = a.abs().max()
    assert (a - b).abs().max() <= 0.02 * scale  # bf16 rounding of the merged weights


def test_merged_model_loads_without_peft(trained):
    root, x = trained
    code = (
        "import sys; sys.modules['peft'] = None\n"  # any `import peft` now fails
        "import torch; from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(root / 'merged')!r}, dtype=torch.bfloat16)\n"
        "print(type(m).__name__, sum(p.numel() for p in m.parameters()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == "LlamaForCausalLM"


def test_merge_refuses_a_folder_without_adapter(tmp_path, capsys):
    assert main(["merge", "--base", str(tmp_path), "--adapter", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "adapter_config.json" in capsys.readouterr().err

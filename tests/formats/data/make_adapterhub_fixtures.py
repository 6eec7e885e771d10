"""Make the AdapterHub fixtures in tests/formats/data/adapterhub/ with the real `adapters` library.

`adapters` 1.3.0 needs transformers ~=4.57 (and huggingface_hub < 1.0), so it cannot be installed
beside adapterzoo's transformers 5.x; run this in a separate environment that has torch,
transformers==4.57.6 and adapters==1.3.0, after saving the tiny bases with transformers 5.x:

    python -c "from adapterzoo.testing.models import tiny_model
    for f in ('bert', 'llama', 'gpt2'): tiny_model(f, 0).save_pretrained(f'/tmp/ah/base-{f}')"
    /tmp/ahvenv/bin/python tests/formats/data/make_adapterhub_fixtures.py /tmp/ah

For each (family, config) it writes the adapter as `model.save_adapter(..., use_safetensors=True)`
saves it, and `reference.safetensors` with the outputs of the adapted model (and of the bare base)
on fixed inputs. tests/formats/test_adapterhub.py loads the adapters into a Zoo on the same bases
and checks the outputs.
"""

import sys
from pathlib import Path

import adapters
import torch
from adapters import BnConfig, DoubleSeqBnConfig
from safetensors.torch import save_file
from transformers import AutoModel, AutoModelForCausalLM

BASES = Path(sys.argv[1])
OUT = Path(__file__).resolve().parent / "adapterhub"
CONFIGS = {
    "double_seq_bn": DoubleSeqBnConfig(reduction_factor=8),  # Houlsby: both places, swish, bottleneck 4
    "output_relu": BnConfig(mh_adapter=False, output_adapter=True, reduction_factor=16, non_linearity="relu"),
}


def inputs() -> torch.Tensor:
    return (torch.arange(2 * 9).reshape(2, 9) * 7 + 5) % 96 + 4


for family in ("bert", "llama", "gpt2"):
    for config_name, config in CONFIGS.items():
        cls = AutoModel if family == "bert" else AutoModelForCausalLM
        model = cls.from_pretrained(BASES / f"base-{family}").eval()
        adapters.init(model)
        with torch.no_grad():
            base = model(input_ids=inputs())
        model.add_adapter("ah", config=config)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".adapters.ah." in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
        model.set_active_adapters("ah")
        with torch.no_grad():
            adapted = model(input_ids=inputs())
        folder = OUT / f"{family}-{config_name}"
        folder.parent.mkdir(parents=True, exist_ok=True)
        model.save_adapter(str(folder), "ah", use_safetensors=True)
        field = "last_hidden_state" if family == "bert" else "logits"
        save_file(
            {"input_ids": inputs(), "base": getattr(base, field), "adapted": getattr(adapted, field)},
            str(folder / "reference.safetensors"),
        )
        print(folder, sorted(p.name for p in folder.iterdir()))

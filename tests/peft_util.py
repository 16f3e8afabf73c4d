"""What the PEFT parity tests share: a transformers model wrapped by peft with random B."""
import torch


def peft_with_random_b(model, *, r: int, alpha: float, targets: list[str], seed: int, scale: float,
                       dropout: float = 0.0):
    """`get_peft_model(model, LoraConfig(...))` with every `lora_B` drawn as `scale * N(0, 1)`
    from `torch.Generator().manual_seed(seed)`: PEFT starts B at zero, which would hide a
    wrong layout or scale. Returns the peft model in eval mode."""
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                  target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    return peft_model.eval()

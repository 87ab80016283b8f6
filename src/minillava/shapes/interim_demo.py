"""Until the bundled model lands: build a tiny random LLaVA, save, load and run it end to end."""

import tempfile

import torch

import minillava
from minillava.config import LlavaConfig, TextConfig, VisionConfig


def main() -> None:
    torch.manual_seed(0)
    config = LlavaConfig(
        vision=VisionConfig(
            hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, image_size=32, patch_size=8
        ),
        text=TextConfig(
            vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, rms_norm_eps=1e-5
        ),
        image_token_id=100,
    )
    with tempfile.TemporaryDirectory() as tmp:
        minillava.save(minillava.Llava(config), f"{tmp}/model")
        model = minillava.load(f"{tmp}/model")
    k = config.num_image_tokens
    ids = torch.cat([torch.tensor([1, 5, 6]), torch.full((k,), config.image_token_id), torch.tensor([7, 8])])[None]
    with torch.no_grad():
        logits = model(ids, pixel_values=torch.randn(1, 3, 32, 32)).logits
    print(f"tiny random LLaVA: {k} image rows spliced into {ids.shape[1]} tokens -> logits {list(logits.shape)}")


if __name__ == "__main__":
    main()

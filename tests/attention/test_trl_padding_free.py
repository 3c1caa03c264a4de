"""TRL's padding-free SFT on attn_implementation="hf_efficient" matches padded SFT on SDPA, step by step."""

import pytest
import torch

import hf_efficient  # noqa: F401
from hf_efficient.models.tiny import tiny_model

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def test_padding_free_sft_losses_match_padded_sdpa(tmp_path, smollm2_tokenizer):
    g = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": torch.randint(3, 250, (int(n),), generator=g).tolist()}
        for n in torch.randint(5, 40, (32,), generator=g)
    ]
    ds = datasets.Dataset.from_list(rows)
    losses = {}
    for attn, padding_free in [("sdpa", False), ("hf_efficient", True)]:
        model = tiny_model("llama", attn_implementation=attn, seed=0)
        cfg = trl.SFTConfig(
            output_dir=str(tmp_path / attn), per_device_train_batch_size=8, max_steps=3, logging_steps=1,
            padding_free=padding_free, max_length=None, report_to=[], learning_rate=1e-3, seed=0, data_seed=0,
            save_strategy="no", use_cpu=True, bf16=False, dataloader_drop_last=True,
        )
        trainer = trl.SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=smollm2_tokenizer)
        trainer.train()
        losses[attn] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses["sdpa"]) == 3
    for a, b in zip(losses["sdpa"], losses["hf_efficient"]):
        assert abs(a - b) <= 1e-5 * abs(a)

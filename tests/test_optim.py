"""Optimiser details of the trainer: which parameters decay, restarted codes under Adam and under
several processes."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_model

from genie_env.models.quantizer import VectorQuantizer
from training.train import StageModule, forget_restarted_codes, param_groups


def test_weight_decay_only_on_matrices():
    g = tiny_model()
    module = StageModule(g, "dynamics", g.config, cotrain_lam=True)
    decay, rest = param_groups(module, 0.1)
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    dec = {id(p) for p in decay["params"]}
    names = {n: id(p) in dec for n, p in module.named_parameters() if p.requires_grad}
    assert len(decay["params"]) + len(rest["params"]) == len(names)
    dyn = "genie.dynamics."
    assert names[dyn + "head.weight"] and names[dyn + "blocks.0.action.weight"]
    for n in (dyn + "head.bias", dyn + "norm.weight", dyn + "pos_emb", dyn + "token_emb.weight",
              dyn + "blocks.0.time_bias", dyn + "blocks.0.norm_t.weight", "genie.latent_actions.quantizer.embed"):
        assert not names[n], n
    assert any(v for n, v in names.items() if n.startswith("genie.latent_actions."))  # its convolutions


def test_restarted_codes_start_without_stale_moments():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 4, ema_decay=0.0).train()
    opt = torch.optim.AdamW(param_groups(vq, 0.0), lr=0.1)
    for _ in range(3):  # moments for every code
        vq.ema_count.fill_(10.0)
        opt.zero_grad()
        out = vq(torch.randn(32, 4))
        (out.codebook_loss + out.commitment_loss).backward()
        forget_restarted_codes(vq, opt)
        opt.step()
    vq.ema_count[:2] = 0.0  # codes 0 and 1 die this step
    opt.zero_grad()
    out = vq(torch.randn(32, 4))
    restarted = vq.embed.detach().clone()
    (out.codebook_loss + out.commitment_loss).backward()
    forget_restarted_codes(vq, opt)
    opt.step()
    torch.testing.assert_close(vq.embed.detach()[:2], restarted[:2], rtol=0, atol=0)  # not moved by old moments
    assert not torch.equal(vq.embed.detach()[2:], restarted[2:])
    assert (opt.state[vq.embed]["exp_avg"][:2] == 0).all()


def _restart_on_two_ranks(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    torch.manual_seed(0)
    models = [VectorQuantizer(8, 4, ema_decay=d).train() for d in (0.0, 0.99)]
    torch.manual_seed(100 + rank)  # each rank its own batches and restart draws
    for _ in range(3):
        for vq in models:
            vq(torch.randn(16, 4) + rank)
    torch.save([m.state_dict() for m in models], f"{out}.{rank}")
    dist.destroy_process_group()


def test_codebooks_stay_identical_across_processes(tmp_path):
    mp.spawn(_restart_on_two_ranks, args=(f"file://{tmp_path / 'store'}", str(tmp_path / "sd")), nprocs=2)
    a, b = (torch.load(tmp_path / f"sd.{r}", weights_only=True) for r in (0, 1))
    for sa, sb in zip(a, b):
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], msg=k)


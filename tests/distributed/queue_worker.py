"""Worker of test_queue_distributed.py (run under torchrun, one process per rank).

Runs the real loader and ReSAM step on this rank's shard for a few steps, pushes the weak-view
embeddings of all ranks into the queue (`push_all_ranks`), and saves what this rank pushed at
every step plus its final queue.
usage: queue_worker.py CONFIG OUT_DIR STEPS
"""

import sys
from pathlib import Path

import torch

from resam_dist import distributed
from resam_dist.config import load_config
from resam_dist.data.pipeline import build_train_loader
from resam_dist.model.build import build_sam
from resam_dist.model.lora import apply_lora
from resam_dist.resam.queue import EmbeddingQueue
from resam_dist.resam.step import resam_step


def main() -> None:
    config, out_dir, steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    cfg = load_config(config)
    info = distributed.init_distributed(60)
    model = apply_lora(build_sam(cfg.model.name, seed=cfg.train.seed), rank=cfg.lora.rank, alpha=cfg.lora.alpha,
                       dropout=0.0, start_block=cfg.lora.start_block, seed=cfg.train.seed + 1)
    loader = build_train_loader(cfg, image_size=model.image_size, rank=info.rank, world_size=info.world_size,
                                local_rank=info.local_rank, device=info.device)
    queue = EmbeddingQueue(cfg.resam.queue_size, model.embed_dim)
    batches = iter(loader)
    for step in range(steps):
        batch = next(batches)
        with torch.no_grad():
            result = resam_step(model, batch, queue, cfg)
        torch.save(result.weak_embeddings, out_dir / f"push_step{step}_rank{info.rank}.pt")
        queue.push_all_ranks(result.weak_embeddings)
    torch.save(queue.state_dict(), out_dir / f"queue_rank{info.rank}.pt")
    distributed.close()


if __name__ == "__main__":
    main()

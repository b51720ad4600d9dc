"""Train an ANN or a spiking FCN/DeepLab network for semantic segmentation.

    python train.py                                   # quickstart: configs/quickstart.yaml (synthetic data)
    python train.py --config configs/voc2012-snn-deeplab.yaml --data_root /data/voc
    python train.py --resume trained_models/<name>/last.pth --epochs 80
    torchrun --nproc_per_node=2 train.py --config ...  # several processes / GPUs / nodes

A run writes <model_dir>/<name>/: config.yaml, metrics.jsonl, last.pth (every epoch), best.pth (best val mIoU).
"""
import argparse
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import setup
from utils.allocator import set_cpu_malloc
from utils.checkpoint import FORMAT, load_checkpoint, load_state, save_checkpoint
from utils.cli import TrainingStopped, run_main
from utils.distributed import (all_reduce_sum, broadcast_buffers, cleanup, get_rank, init_distributed,
                               is_distributed)
from utils.evaluation import autocast, evaluate, to_model_input


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train an ANN or SNN for semantic segmentation. Without any flag: the quickstart "
                    f"({setup.QUICKSTART_CONFIG.relative_to(setup.REPO_ROOT)}).", add_help=add_help)
    parser.add_argument("--resume", type=str, default=None,
                        help="continue from a checkpoint (last.pth); its config is the base, flags override")
    return setup.add_config_arguments(parser)


# ----------------------------------------------------------------------------- one epoch
def train_one_epoch(model, loader, criterion, optimizer, device, epoch: int, cfg: dict, show_bar: bool = True) -> float:
    """One pass over the training loader; returns the mean loss (over all processes).
    Stops with TrainingStopped before applying an update computed from a NaN/inf loss."""
    model.train()
    loss_sum, batches = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not show_bar, dynamic_ncols=True)
    for step, (x, y) in enumerate(bar):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, cfg):
            loss = criterion(model(to_model_input(x, cfg)), y)
        value = loss.item()
        finite = math.isfinite(value)
        if is_distributed():  # every process must stop together, or the others wait forever
            finite = all_reduce_sum([0.0 if finite else 1.0])[0] == 0
        if not finite:
            raise TrainingStopped(f"the training loss became {value} at epoch {epoch + 1}, batch {step + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum, batches = loss_sum + value, batches + 1
        bar.set_postfix(loss=f"{loss_sum / batches:.4f}")
    total, count = all_reduce_sum([loss_sum, float(batches)])
    return total / max(count, 1.0)


# ----------------------------------------------------------------------------- checkpoints and RNG
def rng_state(loader_generator: torch.Generator) -> dict:
    """Every random stream the run draws from, as plain tensors/ints (weights_only-loadable)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": random.getstate(),
        "loader": loader_generator.get_state(),
    }


def restore_rng_state(state: dict, loader_generator: torch.Generator):
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    loader_generator.set_state(state["loader"])


def make_checkpoint(model, optimizer, scheduler, cfg, epochs_done, best_miou, generator, **extra) -> dict:
    return {"format": FORMAT, "config": cfg, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epochs_done, "best_miou": best_miou,
            "rng": rng_state(generator), **extra}


def resume_from(checkpoint, path, model, optimizer, scheduler, generator, cfg) -> tuple[int, float]:
    """Restore a training checkpoint; returns (first epoch to run, best val mIoU so far)."""
    for key in ("optimizer", "scheduler", "epoch", "best_miou", "rng"):
        if key not in checkpoint:
            raise ValueError(f"{path}: cannot resume: the checkpoint has no {key!r} (not a training checkpoint)")
    load_state(model, checkpoint["state_dict"], path, cfg)
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    start_epoch = int(checkpoint["epoch"])
    # The schedule follows the *current* config (e.g. a larger --epochs), like an uninterrupted run of that length.
    for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base_lr * setup.lr_factor(start_epoch, cfg)
    restore_rng_state(checkpoint["rng"], generator)
    if start_epoch >= cfg["epochs"]:
        raise ValueError(f"{path} has already trained {start_epoch} epochs; pass --epochs larger than that to go on")
    return start_epoch, float(checkpoint["best_miou"])


# ----------------------------------------------------------------------------- main
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(f"no flags given: running the quickstart ({setup.QUICKSTART_CONFIG})")
        argv = ["--config", str(setup.QUICKSTART_CONFIG)]
    args = get_args_parser().parse_args(argv)
    dist_info = init_distributed(args.device or "auto")
    try:
        train(args, dist_info)
    finally:
        cleanup()


def train(args, dist_info: dict):
    resume_checkpoint = load_checkpoint(args.resume) if args.resume else None
    cfg = setup.resolve_config(args, base=resume_checkpoint["config"] if resume_checkpoint else None)
    rank, world_size = dist_info["rank"], dist_info["world_size"]
    is_main = rank == 0
    device = setup.resolve_device(cfg, dist_info["local_rank"])
    set_cpu_malloc(cfg["cpu_malloc"], cfg["memory_saving"])
    run_dir = Path(cfg["model_dir"]) / cfg["name"]

    setup.seed_everything(cfg["seed"])
    train_set, val_set = setup.build_datasets(cfg)
    train_loader, val_loader, generator = setup.build_loaders(cfg, train_set, val_set, rank, world_size)
    model = setup.build_model(cfg, device)
    criterion = setup.build_loss()
    optimizer = setup.build_optimizer(cfg, model)
    scheduler = setup.build_scheduler(cfg, optimizer)
    start_epoch, best_miou, best_epoch = 0, -1.0, None
    if resume_checkpoint is not None:
        start_epoch, best_miou = resume_from(resume_checkpoint, args.resume, model, optimizer, scheduler, generator, cfg)
    elif world_size > 1:
        setup.seed_everything(cfg["seed"] + rank)  # the same initial weights everywhere, different spikes per process
    if cfg["see_model"] and is_main:
        print(model)
        print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    net = model
    if world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    logger = setup.build_logger(cfg, run_dir, enabled=is_main)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_checkpoint is None and logger.jsonl_path.exists():
            logger.jsonl_path.unlink()  # a fresh run replaces an older run of the same name
        setup.save_config_yaml(cfg, run_dir / "config.yaml")
        logger.info(f"run {cfg['name']}: {cfg['model_type']} {cfg['arch']} on {cfg['dataset']} "
                    f"({len(train_set)} train / {len(val_set)} val images), device {device}, "
                    f"{world_size} process(es), epochs {start_epoch + 1}..{cfg['epochs']}, files in {run_dir}")

    def save(name, epochs_done, **extra):
        if is_main:
            save_checkpoint(run_dir / name, make_checkpoint(model, optimizer, scheduler, cfg, epochs_done, best_miou,
                                                            generator, **extra))

    epoch = start_epoch
    epochs_done = start_epoch
    try:
        for epoch in tqdm(range(start_epoch, cfg["epochs"]), desc="epochs", initial=start_epoch, total=cfg["epochs"],
                          disable=not is_main, dynamic_ncols=True):
            started = time.time()
            if isinstance(train_loader.sampler, torch.utils.data.DistributedSampler):
                train_loader.sampler.set_epoch(epoch)
            lr = optimizer.param_groups[0]["lr"]
            loss = train_one_epoch(net, train_loader, criterion, optimizer, device, epoch, cfg, show_bar=is_main)
            scheduler.step()
            record = {"epoch": epoch + 1, "loss": loss, "lr": lr}
            if (epoch + 1) % cfg["test_display"] == 0 or epoch + 1 == cfg["epochs"]:
                broadcast_buffers(model)  # BN statistics of rank 0 everywhere: evaluation matches a single process
                metrics = evaluate(net, val_loader, cfg, device, show_bar=is_main)
                record.update({"val_miou": metrics["miou"], "val_pixel_acc": metrics["pixel_acc"],
                               "val_mean_acc": metrics["mean_acc"], "val_fwiou": metrics["fwiou"],
                               "val_pixels": metrics["num_pixels"]})
                if metrics["miou"] > best_miou:
                    best_miou, best_epoch = metrics["miou"], epoch + 1
                    save("best.pth", epoch + 1, metrics=metrics)
            epochs_done = epoch + 1
            save("last.pth", epochs_done)
            record["time"] = round(time.time() - started, 3)
            logger.log_epoch(record)
            logger.info(f"epoch {epoch + 1}/{cfg['epochs']}: loss {loss:.4f}, lr {lr:.3g}"
                        + (f", val mIoU {record['val_miou']:.4f}" if "val_miou" in record else "")
                        + f", {record['time']:.1f}s")
    except TrainingStopped as err:
        kept = f"the last good checkpoint is {run_dir / 'last.pth'} (epoch {epochs_done})" if epochs_done else \
            "no checkpoint was written"
        raise TrainingStopped(f"{err}; training stopped, {kept}. Try a lower --lr.") from None
    except KeyboardInterrupt:
        save("last.pth", epochs_done, interrupted=True)
        if is_main:
            print(f"\ninterrupted during epoch {epoch + 1}: saved {run_dir / 'last.pth'}; continue with "
                  f"`python train.py --resume {run_dir / 'last.pth'}`", file=sys.stderr)
        raise
    finally:
        logger.close()
    if is_main:
        best = f"best val mIoU {best_miou:.4f} (epoch {best_epoch})" if best_epoch else f"best val mIoU {best_miou:.4f}"
        print(f"done: {best}. Files in {run_dir.resolve()}: config.yaml, metrics.jsonl, last.pth, best.pth\n"
              f"evaluate with: python test.py --model_path {run_dir / 'best.pth'}")


if __name__ == "__main__":
    sys.exit(run_main(main))

"""Train an ANN or a spiking FCN/DeepLab network for semantic segmentation.

    python train.py                                   # quickstart: configs/quickstart.yaml (synthetic data)
    python train.py --epochs 1 --timesteps 2          # the quickstart, refined by flags
    python train.py --config configs/voc2012-snn-deeplab.yaml --data_root /data/voc
    python train.py --resume trained_models/<name>/last.pth --epochs 80
    torchrun --nproc_per_node=2 train.py --config ...  # several processes / GPUs / nodes

A run writes <model_dir>/<name>/: config.yaml, metrics.jsonl (appended, one line per epoch), last.pth
(every completed epoch), best.pth (best val mIoU). A folder that holds a run is never overwritten unless
--overwrite is given; docs/runs.md has the rules for resuming, interrupts and failed writes.
"""

import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import setup
from common.cli import ArgumentParser, TrainingStopped, run_main
from common.files import WriteError
from models import resolve_model_config
from utils import plots, preflight
from utils.allocator import set_cpu_malloc
from utils.checkpoint import FORMAT, load_checkpoint, load_state, save_checkpoint
from utils.config import SCHEMA, read_config_layer, recorded_given
from utils.distributed import all_reduce_sum, broadcast_buffers, cleanup, init_distributed, is_distributed
from utils.evaluation import autocast, evaluate, to_model_input
from utils.runs import (
    RunInterrupted,
    claim_run_dir,
    describe_changes,
    holding_interrupts,
    interrupt_handling,
    read_metrics,
    release_run_dir,
    resume_changes,
    resume_location,
)


def get_args_parser(add_help: bool = True) -> ArgumentParser:
    parser = ArgumentParser(
        description="Train an ANN or SNN for semantic segmentation. Without --config, --dataset or --resume: "
        f"the quickstart ({setup.QUICKSTART_CONFIG.relative_to(setup.REPO_ROOT)}), refined by "
        "any flags.",
        add_help=add_help,
    )
    parser.add_argument(
        "--resume",
        type=str,
        default=None,
        help="continue from a checkpoint (last.pth); its config is the base, flags override",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in a run folder that holds a run (the old folder is renamed, not deleted)",
    )
    return setup.add_config_arguments(parser)


# ----------------------------------------------------------------------------- one epoch
PICTURE, PICTURE_IMAGES = "predictions.png", 4  # written into the run folder at the end
LOSS_READ_EVERY = 25  # training steps between reading the losses back from the device (one sync each time)


class LossWindow:
    """The training losses of an epoch, kept on the device and read back every LOSS_READ_EVERY steps (and
    at the end of the epoch) in one transfer, instead of a device sync per step. A non-finite loss stops
    training at the next read, naming its batch: the updates in between never reach a checkpoint, which
    is only written at the end of an epoch that read back finite losses throughout."""

    def __init__(self, epoch: int):
        self.epoch, self.pending, self.first_step = epoch, [], 0
        self.total, self.count = 0.0, 0

    def add(self, loss: torch.Tensor) -> bool:
        """Keep one step's loss; True when the window was read back (the running mean is then current)."""
        self.pending.append(loss.detach())
        if len(self.pending) < LOSS_READ_EVERY:
            return False
        self.read()
        return True

    def read(self):
        if not self.pending:
            return
        values = torch.stack(self.pending).tolist()
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if is_distributed():  # every process must stop together, or the others wait forever
            bad_anywhere = all_reduce_sum([0.0 if bad is None else 1.0])[0] > 0
        else:
            bad_anywhere = bad is not None
        if bad_anywhere:
            where = f"batch {self.first_step + bad + 1}" if bad is not None else "another process"
            value = values[bad] if bad is not None else math.nan
            raise TrainingStopped(f"the training loss became {value} at epoch {self.epoch + 1}, {where}")
        for v in values:  # the same float64 sum, in the same order, as reading each step
            self.total += v
        self.count += len(values)
        self.first_step += len(values)
        self.pending = []

    @property
    def mean(self) -> float:
        return self.total / max(self.count, 1)


def train_one_epoch(model, loader, criterion, optimizer, device, epoch: int, cfg: dict, show_bar: bool = True) -> float:
    """One pass over the training loader; returns the mean loss (over all processes).
    Stops with TrainingStopped when a loss is NaN/inf (read back every LOSS_READ_EVERY steps: LossWindow)."""
    model.train()
    losses = LossWindow(epoch)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not show_bar, dynamic_ncols=True)
    for x, y in bar:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, cfg):
            inputs = to_model_input(x, cfg)
            # a loss of auxiliary heads takes them all (SegmentationNet.forward with heads=True)
            loss = criterion(model(inputs, heads=True) if getattr(criterion, "heads", False) else model(inputs), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if losses.add(loss):
            bar.set_postfix(loss=f"{losses.mean:.4f}")
    losses.read()
    total, count = all_reduce_sum([losses.total, float(losses.count)])
    return total / max(count, 1.0)


# ----------------------------------------------------------------------------- checkpoints and RNG
def rng_state(loader_generator: torch.Generator) -> dict:
    """Every random stream the run draws from, as plain tensors/ints (weights_only-loadable)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "python": random.getstate(),
        "loader": loader_generator.get_state(),
    }


def restore_rng_state(state: dict, loader_generator: torch.Generator):
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["name"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["gauss"],
        )
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    loader_generator.set_state(state["loader"])


def make_checkpoint(model, optimizer, scheduler, cfg, epochs_done, best_miou, generator, **extra) -> dict:
    return {
        "format": FORMAT,
        "config": cfg,
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epochs_done,
        "best_miou": best_miou,
        "rng": rng_state(generator),
        **extra,
    }


def check_resume(checkpoint, path, cfg) -> dict:
    """Before any work: the checkpoint is a training checkpoint at an epoch boundary, --epochs goes further
    and every changed setting may change (utils/runs.py, resume_changes: the model is the checkpoint's, the
    optimizer settings are applied). Returns the changes {key: [old, new]}."""
    for key in ("optimizer", "scheduler", "epoch", "best_miou", "rng"):
        if key not in checkpoint:
            raise ValueError(f"{path}: cannot resume: the checkpoint has no {key!r} (not a training checkpoint)")
    if checkpoint.get("interrupted"):  # written by older versions on Ctrl-C: part of an epoch, mislabelled
        raise ValueError(
            f"{path} holds an interrupted epoch, not an epoch boundary; resume from a checkpoint "
            f"written at the end of an epoch"
        )
    old = resolve_model_config(read_config_layer(checkpoint["config"], path, strict=False), SCHEMA)
    changes = resume_changes(old, cfg, path)
    if int(checkpoint["epoch"]) >= cfg["epochs"]:
        raise ValueError(
            f"{path} has already trained {checkpoint['epoch']} epochs; pass --epochs larger than that to go on"
        )
    return changes


def resume_from(checkpoint, path, model, optimizer, scheduler, generator, cfg) -> tuple[int, float]:
    """Restore a training checkpoint; returns (first epoch to run, best val mIoU so far)."""
    load_state(model, checkpoint["state_dict"], path, cfg)
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    start_epoch = int(checkpoint["epoch"])
    apply_optimizer_settings(optimizer, scheduler, cfg, start_epoch)
    restore_rng_state(checkpoint["rng"], generator)
    return start_epoch, float(checkpoint["best_miou"])


def apply_optimizer_settings(optimizer, scheduler, cfg: dict, epoch: int):
    """The optimizer settings of `cfg` (lr, weight_decay, momentum) over those the checkpoint stored; the
    schedule follows the current config (a larger --epochs, another --scheduler), as an uninterrupted run
    of these settings would from `epoch` on. Unchanged settings leave every value as it was."""
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg["lr"]
        group["weight_decay"] = cfg["weight_decay"]
        if cfg["optimizer"] == "sgd":
            group["momentum"] = cfg["momentum"]
        group["lr"] = cfg["lr"] * setup.lr_factor(epoch, cfg)
    scheduler.base_lrs = [cfg["lr"]] * len(optimizer.param_groups)


def on_main_process(is_main: bool, action):
    """Run `action` on process 0 only; if it fails, every process stops (the others would wait forever)."""
    result, error = None, None
    if is_main:
        try:
            result = action()
        except (ValueError, OSError) as err:
            error = err
    if all_reduce_sum([1.0 if error else 0.0])[0]:
        raise error or ValueError("process 0 could not start the run (its error says why)")
    return result


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = get_args_parser().parse_args(argv)
    with interrupt_handling():  # SIGINT and SIGTERM: utils/runs.py
        dist_info = init_distributed(args.device or "auto")
        try:
            train(args, dist_info)
        finally:
            cleanup()


def prepare(args, dist_info: dict):
    """Everything that can refuse the run, before any work: (config, resumed checkpoint, run folder,
    changes from the checkpoint's settings)."""
    is_main = dist_info["rank"] == 0
    preflight.check_inputs([("--config", args.config, "file"), ("--resume", args.resume, "file")])
    resumed = load_checkpoint(args.resume) if args.resume else None
    base = {**resumed["config"], **resume_location(resumed["config"], args.resume)} if resumed else None
    base_given = None
    if resumed:  # the keys its run was given, and the run folder it lies in
        base_given = recorded_given(resumed, read_config_layer(resumed["config"], args.resume, strict=False))
        base_given |= set(resume_location(resumed["config"], args.resume))
    cfg, sources = setup.resolve_config_sources(args, base=base, base_source=args.resume, base_given=base_given)
    args.given = sorted(setup.given_keys(sources))  # recorded in the checkpoints (utils/config.py)
    changes = check_resume(resumed, args.resume, cfg) if resumed is not None else {}
    if is_main:
        first = describe_changes(changes, int(resumed["epoch"]) + 1) if changes else ""
        print(setup.describe_config(args, args.resume) + (f"; {first}" if first else ""), flush=True)
    preflight.check_inputs(
        [("data_root", cfg.get("data_root"), "any"), ("datalist", cfg.get("datalist"), "file")]
        + [("pretrained", cfg.get("pretrained"), "file")]
    )
    setup.check_run(cfg)
    device = setup.resolve_device(cfg, dist_info["local_rank"])  # refused before the run folder is claimed
    check_resources(cfg, device)  # at the native size, again once the images are known
    return cfg, resumed, Path(cfg["model_dir"]) / cfg["name"], changes


def train(args, dist_info: dict):
    is_main = dist_info["rank"] == 0
    cfg, resumed, run_dir, changes = prepare(args, dist_info)
    resume = (args.resume, int(resumed["epoch"])) if resumed else None
    claimed = on_main_process(is_main, lambda: claim_run_dir(run_dir, resume, args.overwrite))
    note, created = claimed if is_main else (None, [])
    own_folder = resumed is not None and Path(args.resume).resolve().parent == run_dir.resolve()
    # What the run has kept so far and how to go on from it, for the line an interrupt ends with.
    progress = dict(
        cfg=cfg,
        run_dir=run_dir,
        changes=changes,  # recorded in the first metrics line of this start
        # the checkpoint a resume would start from: (path, epoch); updated at each epoch boundary
        kept=None
        if resumed is None
        else (run_dir / "last.pth" if own_folder else Path(args.resume), int(resumed["epoch"])),
        world_size=dist_info["world_size"],
    )
    try:
        run(args, dist_info, cfg, resumed, run_dir, note, progress)
    except KeyboardInterrupt as err:  # SIGINT or SIGTERM (utils/runs.py); nothing more is written now
        signum = getattr(err, "signum", signal.SIGINT)
        raise RunInterrupted(signum, interrupted_message(progress, signal.Signals(signum).name)) from None
    except RuntimeError as err:
        if not peer_lost(err):
            raise
        reason = "another process of this run stopped"
        raise RunInterrupted(signal.SIGTERM, interrupted_message(progress, reason)) from None
    finally:
        if is_main:
            release_run_dir(run_dir, created)


def check_resources(cfg: dict, device, train_set=None):
    """Before any work: a training step fits in the memory of `device` (utils/preflight.py's estimate; on
    the CPU the processes of this machine share it). At the native size the largest image of `train_set`
    counts; without it, the check waits for it."""
    size = preflight.largest_input_size(train_set, cfg)
    if size is None:
        return
    snn = cfg["model_type"] == "snn"
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if device.type == "cpu" else 1
    preflight.check_memory(
        cfg,
        cfg["batch_size"] * processes,
        cfg["timesteps"] if snn else 1,
        size,
        device,
        training=True,
        what="training",
        lower="--batch_size or --img_size" + (", --timesteps, or use --memory_saving" if snn else ""),
    )


def run(args, dist_info, cfg, resumed, run_dir, note, progress):
    rank, world_size = dist_info["rank"], dist_info["world_size"]
    is_main = rank == 0
    device = setup.resolve_device(cfg, dist_info["local_rank"])
    set_cpu_malloc(cfg["cpu_malloc"], cfg["memory_saving"])

    setup.seed_everything(cfg["seed"])
    train_set, val_set = setup.build_datasets(cfg)
    if not isinstance(cfg["img_size"], list):  # the native size: checked now that the images are known
        check_resources(cfg, device, train_set)
    train_loader, val_loader, generator = setup.build_loaders(cfg, train_set, val_set, rank, world_size)
    model = setup.build_model(cfg, device)
    criterion = setup.build_loss(cfg)
    optimizer = setup.build_optimizer(cfg, model)
    scheduler = setup.build_scheduler(cfg, optimizer)
    start_epoch, best_miou = 0, -1.0
    if resumed is not None:
        start_epoch, best_miou = resume_from(resumed, args.resume, model, optimizer, scheduler, generator, cfg)
    elif world_size > 1:
        setup.seed_everything(cfg["seed"] + rank)  # the same initial weights everywhere, different spikes per process
    if cfg["see_model"] and is_main:
        print(model)
        print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    net = model
    if world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(getattr(model, "unused_gradients", False)),  # e.g. spike-brgnet's
        )

    logger = setup.build_logger(cfg, run_dir, enabled=is_main)
    if is_main:
        if resumed is not None and Path(args.resume).resolve().parent == run_dir.resolve():
            restore_record(logger, resumed)
        logger.info(
            f"run {cfg['name']}: {cfg['model_type']} {cfg['arch']} on {cfg['dataset']} "
            f"({len(train_set)} train / {len(val_set)} val images), device {device}, "
            f"{world_size} process(es), epochs {start_epoch + 1}..{cfg['epochs']}, files in {run_dir}"
            + (f"; {note}" if note else "")
        )
    state = progress  # run_epochs and commit_epoch keep it up to date
    state.update(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        generator=generator,
        logger=logger,
        is_main=is_main,
        config_written=False,  # config.yaml is written with the first epoch boundary of this start
        given=getattr(args, "given", None),  # the keys given (utils/config.py, given_keys), kept beside the config
    )
    try:
        best_miou = run_epochs(net, train_loader, val_loader, criterion, device, start_epoch, best_miou, state)
    finally:
        logger.close()
    if is_main:
        report_done(run_dir, best_miou, args.resume)
        draw_picture(model, val_set, cfg, device, run_dir)


def restore_record(logger, checkpoint):
    """Append the resumed epoch's metrics line if a run killed between the two wrote its checkpoint
    (which keeps the line) but not the line."""
    epoch, record = int(checkpoint["epoch"]), checkpoint.get("record")
    saved = [r for r in read_metrics(logger.jsonl_path) if r["epoch"] == epoch and "checkpoint_error" not in r]
    if record and not saved:
        logger.log_epoch(record)


def run_epochs(net, train_loader, val_loader, criterion, device, start_epoch, best_miou, state) -> float:
    cfg, run_dir, is_main = state["cfg"], state["run_dir"], state["is_main"]
    try:
        for epoch in tqdm(
            range(start_epoch, cfg["epochs"]),
            desc="epochs",
            initial=start_epoch,
            total=cfg["epochs"],
            disable=not is_main,
            dynamic_ncols=True,
        ):
            started = time.time()
            if isinstance(train_loader.sampler, torch.utils.data.DistributedSampler):
                train_loader.sampler.set_epoch(epoch)
            lr = state["optimizer"].param_groups[0]["lr"]
            loss = train_one_epoch(
                net, train_loader, criterion, state["optimizer"], device, epoch, cfg, show_bar=is_main
            )
            check_finite_state(state["model"], epoch)
            state["scheduler"].step()
            record = {"epoch": epoch + 1, "loss": loss, "lr": lr}
            improved = False
            if (epoch + 1) % cfg["test_display"] == 0 or epoch + 1 == cfg["epochs"]:
                broadcast_buffers(state["model"])  # BN statistics of rank 0 everywhere: evaluation matches one process
                metrics = evaluate(net, val_loader, cfg, device, show_bar=is_main)
                record.update(
                    {
                        "val_miou": metrics["miou"],
                        "val_pixel_acc": metrics["pixel_acc"],
                        "val_mean_acc": metrics["mean_acc"],
                        "val_fwiou": metrics["fwiou"],
                        "val_pixels": metrics["num_pixels"],
                    }
                )
                improved = metrics["miou"] > best_miou
                best_miou = metrics["miou"] if improved else best_miou
            record["time"] = round(time.time() - started, 3)
            with holding_interrupts():  # Ctrl-C waits until the epoch boundary is written whole
                if is_main:
                    commit_epoch(state, record, best_miou, improved)
                else:
                    state["kept"] = (run_dir / "last.pth", epoch + 1)
            state["logger"].info(
                f"epoch {epoch + 1}/{cfg['epochs']}: loss {loss:.4f}, lr {lr:.3g}"
                + (f", val mIoU {record['val_miou']:.4f}" if "val_miou" in record else "")
                + f", {record['time']:.1f}s"
            )
    except TrainingStopped as err:
        raise TrainingStopped(f"{err}; training stopped, {kept(state)}. Try a lower --lr.") from None
    return best_miou


def peer_lost(err: RuntimeError) -> bool:
    """A collective failed because another process of a torchrun run ended (Ctrl-C, killed, crashed)."""
    import torch.distributed as dist

    text = str(err)
    return is_distributed() and (
        isinstance(err, getattr(dist, "DistError", ())) or any(w in text for w in ("gloo", "NCCL", "Connection"))
    )


def check_finite_state(model, epoch: int):
    """Stop like a non-finite loss does when a weight or a BN statistic became NaN/inf (a huge --lr can
    leave the loss finite while the statistics overflow); every process stops together."""
    bad = next((k for k, v in model.state_dict().items() if v.is_floating_point() and not v.isfinite().all()), None)
    if is_distributed():
        bad = bad or ("a tensor of another process" if all_reduce_sum([1.0 if bad else 0.0])[0] else None)
    if bad:
        raise TrainingStopped(f"{bad} became NaN or infinite in epoch {epoch + 1}")


def kept(state) -> str:
    if state["kept"] is None:
        return "no epoch was completed, so no checkpoint was written"
    path, epoch = state["kept"]
    return f"the last good checkpoint is {path} (epoch {epoch})"


def resume_command(state) -> str:
    """The command that continues from the last good checkpoint."""
    path, _ = state["kept"]
    cfg, run_dir = state["cfg"], state["run_dir"]
    if state["world_size"] > 1:
        nodes = int(os.environ.get("WORLD_SIZE", 1)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        launch = f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', state['world_size'])}"
        launch += "" if nodes <= 1 else " (and the node options of this run)"
        command = f"{launch} train.py --resume {path}"
    else:
        command = f"python train.py --resume {path}"
    if Path(path).resolve().parent != run_dir.resolve():  # nothing saved in this run's folder yet
        command += f" --model_dir {cfg['model_dir']} --name {cfg['name']}"
        command += "".join(
            f" --{k} {new}" for k, (old, new) in state["changes"].items() if k not in ("model_dir", "name")
        )
    return command


def interrupted_message(state, reason: str) -> str:
    """One line: why the run ended, what is kept, and how to go on."""
    if state["kept"] is None:
        return f"interrupted ({reason}); {kept(state)}: start the run again"
    return (
        f"interrupted ({reason}); {kept(state)}: continue with `{resume_command(state)}`, which repeats the "
        f"unfinished epoch from its start"
    )


def commit_epoch(state, record: dict, best_miou: float, improved: bool):
    """Write the epoch boundary: config.yaml (first boundary of this start: the settings have run now),
    best.pth if the mIoU improved, last.pth, then the metrics line; the first line of a resumed run that
    changed settings says which ("changes": {key: [old, new]}). If a file cannot be written, the line is
    still appended (marked) and training stops."""
    epoch = record["epoch"]
    if state["changes"]:
        record["changes"] = state["changes"]

    def save(name, **extra):
        save_checkpoint(
            state["run_dir"] / name,
            make_checkpoint(
                state["model"],
                state["optimizer"],
                state["scheduler"],
                state["cfg"],
                epoch,
                best_miou,
                state["generator"],
                **({} if state.get("given") is None else {"given": state["given"]}),
                **extra,
            ),
        )

    try:
        if not state["config_written"]:
            setup.save_config_yaml(state["cfg"], state["run_dir"] / "config.yaml")
            state["config_written"] = True
        if improved:  # with the epoch's record too: a resume from best.pth restores its metrics line
            save("best.pth", metrics={k: v for k, v in record.items() if k.startswith("val_")}, record=record)
        save("last.pth", record=record)
    except WriteError as err:
        state["logger"].log_epoch({**record, "checkpoint_error": str(err)})
        go_on = (
            f"continue with `{resume_command(state)}`"
            if state["kept"] is not None
            else "start the run again with --overwrite (no epoch of it was saved)"
        )
        raise WriteError(
            f"{err}. Epoch {epoch}'s metrics are in {state['logger'].jsonl_path}; once the cause is fixed, {go_on}"
        ) from None
    state["logger"].log_epoch(record)
    state["kept"], state["changes"] = (state["run_dir"] / "last.pth", epoch), {}


def best_elsewhere(run_dir: Path, resumed_from) -> Path | None:
    """The best checkpoint of a run continued into `run_dir` from another folder, whose epochs did not
    improve on it: the resumed best.pth itself, or the best.pth beside the resumed last.pth."""
    if resumed_from is None or (run_dir / "best.pth").exists():
        return None
    resumed_from = Path(resumed_from)
    best = resumed_from if resumed_from.name == "best.pth" else resumed_from.with_name("best.pth")
    return best if best.is_file() and best.resolve().parent != run_dir.resolve() else None


def report_done(run_dir: Path, best_miou: float, resumed_from=None):
    present = [name for name in ("config.yaml", "metrics.jsonl", "last.pth", "best.pth") if (run_dir / name).exists()]
    best_epoch = next(
        (r["epoch"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("val_miou") == best_miou), None
    )
    best = f"best val mIoU {best_miou:.4f}" + (f" (epoch {best_epoch})" if best_epoch else "")
    elsewhere = best_elsewhere(run_dir, resumed_from)
    if elsewhere is not None:  # this folder has no best.pth: no epoch of it improved on the resumed run
        best += f", in {elsewhere} (no epoch of this run improved on it, so {run_dir} has no best.pth)"
    print(f"done: {best}. Files in {run_dir.resolve()}: {', '.join(present)}")
    if "best.pth" in present or elsewhere is not None:
        print(f"evaluate with: python test.py --model_path {elsewhere or run_dir / 'best.pth'}")


def draw_picture(model, val_set, cfg, device, run_dir: Path):
    """The run's last word: a picture of a few validation images (input | ground truth | prediction | one
    layer's activity) by the trained model, and its path as the last line printed."""
    try:
        path = plots.save_activity_grid(model, val_set, cfg, device, run_dir / PICTURE, PICTURE_IMAGES)
    except WriteError as err:  # the run itself is complete: say so
        raise WriteError(f"{err}; the run itself is complete (its checkpoints and metrics are saved)") from None
    print(
        f"picture of {min(PICTURE_IMAGES, len(val_set))} validation images (input | ground truth | prediction | "
        "activity of one layer):"
    )
    print(path.resolve())


if __name__ == "__main__":
    sys.exit(run_main(main))

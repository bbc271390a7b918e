"""Train the 3D U-Net on random patches; validate on whole volumes; checkpoint and plot every epoch.

    python train.py                                  # settings from hyperparameters.txt
    python train.py epochs=5 batch_size=1 resume=True
    python train.py fold=2                           # with num_folds > 1: validate on fold 2, train on the others
    torchrun --nproc_per_node=4 train.py             # DistributedDataParallel, one process per GPU

Writes to run_dir (with num_folds > 1: run_dir/fold_K): checkpoint_last.pt (every epoch) and
checkpoint_best.pt (best mean Dice); through training_log.py metrics.csv (a row per epoch), curves.png and,
with tensorboard: True, tensorboard/; at the end the validation cases predicted with checkpoint_best.pt into
validation/ (the out-of-fold predictions crossval.py reads). Under torchrun batch_size is per process, the
global batch is batch_size * processes, and a step sees the same patches as one process with that global batch.
"""
import datetime
import math
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import augment
import conventions
import dataset
import hyperparameters
import loss
import model
import predict
import prepare_dataset
import training_log
from devices import resolve_device, run_settings, run_torchrun_process, start_process_group, use_device
from files import output_folder

RUN_FILES = ("checkpoint_last.pt", "checkpoint_best.pt", "metrics.csv", "curves.png")  # what a run writes
# How long a process waits for the others in a collective before it fails: long enough for the slowest
# process's share of validation, short enough that a dead process cannot hang the others for good.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=10)


# ---------------------------------------------------------------- optimization

def lr_factor(step, hp):
    """Learning-rate multiplier of optimizer step `step` (from 0): linear warm-up, then the schedule."""
    total, warmup = hp.epochs * hp.steps_per_epoch, hp.warmup_epochs * hp.steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    t = min((step - warmup) / max(total - warmup, 1), 1.0)  # 0 -> 1 over the steps after warm-up
    if hp.lr_schedule == "poly":
        return (1 - t) ** 0.9  # as nnU-Net
    if hp.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    return 1.0


def make_optimizer(net, hp):
    """AdamW, or nnU-Net's SGD with Nesterov momentum; weight decay as hp.weight_decay."""
    if hp.optimizer == "sgd":
        return torch.optim.SGD(net.parameters(), lr=hp.learning_rate, momentum=hp.momentum, nesterov=True,
                               weight_decay=hp.weight_decay)
    return torch.optim.AdamW(net.parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay)


def train_epoch(train_model, batches, optimizer, scheduler, scaler, loss_fn, hp, device, dtype, epoch,
                world_size, main_process):
    """hp.steps_per_epoch optimizer steps -> (mean finite loss over all processes, skipped steps)."""
    loss_sum, loss_count, skipped = 0.0, 0, 0
    channels_last = run_settings(hp.precision, hp.channels_last, device)[2]
    params = [p for p in train_model.parameters() if p.requires_grad]
    bar = training_log.progress_bar(hp.steps_per_epoch, f"epoch {epoch}/{hp.epochs}", disable=not main_process)
    start = time.perf_counter()
    for step, batch in enumerate(batches, start=1):
        image, labels = augment.to_device(batch, device, hp.patch_size)  # (B, C, px, py, pz), (B, px, py, pz)
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = train_model(image)  # (B, C_out, px, py, pz); a list of them with deep supervision
        logits = [x.float() for x in logits] if isinstance(logits, list) else logits.float()
        batch_loss = loss_fn(logits, labels)  # float32 scalar, outside autocast
        finite = torch.isfinite(batch_loss.detach()).int()
        if world_size > 1:  # all processes skip together, or the gradient all-reduce would wait forever
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        finite = bool(finite.item())
        if finite:
            scaler.scale(batch_loss).backward()
            scaler.unscale_(optimizer)  # clip the true gradient, not the fp16-scaled one
            norm = torch.nn.utils.clip_grad_norm_(params, hp.grad_clip if hp.grad_clip > 0 else math.inf)
            if scaler.is_enabled() or torch.isfinite(norm):  # with fp16 the scaler skips inf/NaN gradients
                scaler.step(optimizer)
            scaler.update()
            loss_sum, loss_count = loss_sum + batch_loss.item(), loss_count + 1
        if not finite or not torch.isfinite(norm):  # gradients are all-reduced: the same in every process
            skipped += 1
            if main_process:
                tqdm.write(f"non-finite {'gradients' if finite else 'loss'} at epoch {epoch} step {step}: skipped")
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()  # skipped or not: the schedule follows the step count, also after a resume
        rate = step * hp.batch_size * world_size / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{batch_loss.item():.4f}", patches_per_s=f"{rate:.1f}", refresh=False)  # update() draws
        bar.update()
    bar.close()
    totals = torch.tensor([loss_sum, loss_count], dtype=torch.float64)  # in CPU memory: Gloo's part of the group
    if world_size > 1:
        dist.all_reduce(totals)
    return (totals[0] / totals[1]).item() if totals[1] > 0 else math.nan, skipped


# ---------------------------------------------------------------- validation

@torch.no_grad()
def validate(net, volumes, hp, device, rank=0, world_size=1):
    """(mean Dice per region, mean Dice (= mean F1) and accuracy over the whole validation volumes, the
    predicted labels of case 0 in process 0 (None elsewhere), for TensorBoard's picture).
    Process r takes cases r, r + W, ... (none padded or repeated); the means run over the cases in
    their order, so any number of processes gives the same numbers."""
    net.eval()
    no_tta = hp.replace(tta_mirror=False)  # validation each epoch: one pass per window
    results, first = [], None
    for index in range(rank, len(volumes), world_size):
        _, image, truth = volumes[index]  # (C, x, y, z), (x, y, z)
        probabilities = predict.predict_case(net, image.to(device), no_tta, hp.target)  # as predict.py does
        labels = loss.probabilities_to_labels(probabilities, hp.target).cpu().numpy()  # (x, y, z)
        dice = loss.dice_per_region(labels, truth.numpy())
        first = labels if index == 0 else first
        results.append((index, [dice[region] for region in conventions.REGION_NAMES],
                        loss.accuracy(labels, truth.numpy())))
    net.train()
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, results)
        results = [result for part in gathered for result in part]
    results.sort()
    dice = np.mean([dice for _, dice, _ in results], axis=0)  # (3,) WT, TC, ET
    row = {f"dice_{region}": float(value) for region, value in zip(conventions.REGION_NAMES, dice)}
    return {**row, "dice_mean": float(dice.mean()), "accuracy": float(np.mean([a for _, _, a in results]))}, first


def resume_state(hp, net, optimizer, scheduler, scaler, main_process, split):
    """Restore run_dir/checkpoint_last.pt in place -> (completed epochs, best score, metrics rows)."""
    path = hp.run_dir / "checkpoint_last.pt"
    if not path.is_file():
        if main_process:
            print(f"resume: True, but there is no {path}: starting from scratch")
        return 0, None, []
    checkpoint = model.load_checkpoint(path)
    missing = [key for key in ("model_args", "model", "optimizer", "scheduler", "epoch", "rng", "metrics")
               if key not in checkpoint]
    if missing:
        raise ValueError(f"{path}: not a checkpoint of train.py (no {', '.join(missing)}); train in another run_dir")
    weights = model.strip_wrapper_prefixes(checkpoint["model"])
    problems = model.describe_mismatch(net, weights)
    if checkpoint["model_args"] != model.model_args(hp) or problems:
        differ = model.describe_args_difference(checkpoint["model_args"], model.model_args(hp))
        raise ValueError(f"{path}: the network was trained with other settings ({differ or 'the same model_args'}); "
                         f"weights that do not fit: {problems or 'none'}; set them back or train in another run_dir")
    if checkpoint.get("split", split) != split:
        raise ValueError(f"{path}: trained on other cases than fold {hp.fold} of dataset.json now holds (it was split "
                         "again); train this fold in a new run_dir")
    net.load_state_dict(weights)
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    if checkpoint["scaler"] and scaler.is_enabled():  # empty when saved without fp16 (e.g. on a CPU)
        scaler.load_state_dict(checkpoint["scaler"])
    model.set_rng_state(checkpoint["rng"])
    if main_process:
        before = checkpoint["hyperparameters"]
        changed = [f"{k} {before.get(k)} -> {v}" for k, v in hp.to_dict().items()
                   if k != "resume" and before.get(k) != v]
        print(f"resuming {path} after epoch {checkpoint['epoch']}" + f"; changed: {', '.join(changed)}" * bool(changed))
    return checkpoint["epoch"], checkpoint["best_score"], checkpoint["metrics"]


# ---------------------------------------------------------------- training

def start_run_dir(run_dir, hp):
    """Create run_dir and check it is writable before any work. A trained run in it is continued
    (resume=True), started over (overwrite=True: its files are removed) or refused."""
    output_folder(run_dir, "run_dir")
    trained = [name for name in RUN_FILES[:2] if (run_dir / name).is_file()]
    if trained and not hp.resume:
        if not hp.overwrite:
            raise ValueError(f"{run_dir} holds a trained run ({trained[0]}): resume=True continues it, "
                             "overwrite=True starts it over, or set another run_dir")
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)


def build_model(hp, device, world_size, main_process):
    """-> (the network, what training calls: the network wrapped for DDP and torch.compile as asked)."""
    torch.manual_seed(hp.seed)  # the same initial weights in every process and every run
    random.seed(hp.seed)  # and the same global random states, which checkpoints keep: equal checkpoints per seed
    np.random.seed(hp.seed)
    net = model.build_model(hp).to(device)
    if run_settings(hp.precision, hp.channels_last, device)[2]:
        net = net.to(memory_format=torch.channels_last_3d)
    train_model = net
    if world_size > 1:
        if hp.norm == "batch" and device.type == "cuda":
            train_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)  # statistics over all GPUs
        elif hp.norm == "batch" and main_process:
            print("norm: batch on CPU processes: batch statistics stay per process (SyncBatchNorm needs GPUs)")
        train_model = DistributedDataParallel(train_model, [device.index] if device.type == "cuda" else None)
    return net, torch.compile(train_model) if hp.compile else train_model


def train(hp):
    """Train fold hp.fold per hp (continuing its checkpoint_last.pt when hp.resume), then predict its validation
    cases -> the last epoch's metrics row plus best_dice_mean and best_epoch."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    main_process = rank == 0
    device = resolve_device(hp.device, int(os.environ.get("LOCAL_RANK", 0)), world_size)
    use_device(device)
    if world_size > 1 and not dist.is_initialized():  # one group per process: crossval.py's folds share it
        start_process_group(device, PROCESS_GROUP_TIMEOUT)
    dtype, use_scaler, channels_last = run_settings(hp.precision, hp.channels_last, device)

    manifest = prepare_dataset.read_manifest(hp.prepared_dir, hp.data_format)
    dataset.check_prepared_settings(manifest, hp)  # channels, crop margin and format come from the prepared data
    model.check_patch_size(hp)
    train_names, val_names = dataset.fold_cases(manifest, hp)
    split = {"fold": hp.fold, "train": train_names, "val": val_names}  # kept in the checkpoints: resume checks it
    hp = hp.replace(run_dir=dataset.fold_dir(hp))
    patches = dataset.PatchDataset(hp.prepared_dir, train_names, hp.patch_size, hp.foreground_fraction,
                                   hp.augment, hp.seed, hp.steps_per_epoch * hp.batch_size * world_size,
                                   augment.runs_on_device(hp.augment, hp.augment_on, device))
    volumes = dataset.VolumeDataset(hp.prepared_dir, val_names) if val_names else None
    sampler = dataset.EpochSampler(hp.steps_per_epoch, hp.batch_size, rank, world_size)
    net, train_model = build_model(hp, device, world_size, main_process)
    loss_fn = loss.make_loss(hp)
    optimizer = make_optimizer(net, hp)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, hp))
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    done, best_score, rows = 0, None, []
    if hp.resume:
        done, best_score, rows = resume_state(hp, net, optimizer, scheduler, scaler, main_process, split)
    if main_process:
        start_run_dir(hp.run_dir, hp)
        print(f"training on {device} x {world_size} process(es), {dtype or torch.float32}"
              f"{' with loss scaling' if use_scaler else ''}{', channels_last' * channels_last}, "
              f"{model.count_parameters(net):,} parameters, "
              f"{len(train_names)} training / {len(val_names)} validation cases"
              f"{f' (fold {hp.fold} of {hp.num_folds})' * (hp.num_folds > 1)}, global batch "
              f"{hp.batch_size * world_size}, epochs {done + 1}..{hp.epochs}")
        if volumes is None:
            print("no validation cases: checkpoint_best.pt is the latest epoch")
        if done >= hp.epochs:
            print(f"{hp.run_dir} has trained {done} epochs already; raise epochs to train on")
    show = world_size == 1 and training_log.interactive_plots()
    log = training_log.TrainingLog(hp, done, show) if main_process else None
    sampler.set_epoch(done + 1)
    loader = dataset.start_loader(patches, sampler, hp.batch_size, hp.num_workers, device)

    for epoch in range(done + 1, hp.epochs + 1):
        start, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]  # the epoch's first learning rate
        sampler.set_epoch(epoch)
        train_loss, skipped = train_epoch(train_model, loader, optimizer, scheduler, scaler, loss_fn, hp, device,
                                          dtype, epoch, world_size, main_process)
        diverged = model.non_finite_weights(net)  # the same in every process: the gradients are all-reduced
        if diverged:
            raise ValueError(f"epoch {epoch}: the weights became NaN or Inf ({', '.join(diverged[:3])}); stopped "
                             f"before saving them, {hp.run_dir} keeps the last good checkpoints; lower learning_rate")
        row = {"epoch": epoch, "train_loss": train_loss, "lr": lr, "skipped_steps": skipped,
               **dict.fromkeys(("dice_WT", "dice_TC", "dice_ET", "dice_mean", "accuracy"))}
        labels = None
        if volumes is not None and (epoch % hp.val_every == 0 or epoch == hp.epochs):
            metrics, labels = validate(net, volumes, hp, device, rank, world_size)
            row.update(metrics)
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        improved = volumes is None or (row["dice_mean"] is not None and
                                       (best_score is None or row["dice_mean"] > best_score))
        best_score = row["dice_mean"] if improved else best_score
        if main_process:
            log.to_tensorboard(row, volumes, labels)
            state = {"model_args": model.model_args(hp), "model": net.state_dict(), "epoch": epoch,
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(), "best_score": best_score, "metrics": rows, "rng": model.rng_state(),
                     "hyperparameters": hp.to_dict(), "world_size": world_size, "split": split}
            model.save_checkpoint(state, hp.run_dir / "checkpoint_last.pt")
            if improved:
                model.save_checkpoint(state, hp.run_dir / "checkpoint_best.pt")
            log.write(rows, improved and volumes is not None, device)
    if main_process:
        log.close()
    if main_process and val_names:  # the out-of-fold predictions; redone when this call trained
        predict.predict_validation(hp, val_names, overwrite=done < hp.epochs)
    best_epochs = [row["epoch"] for row in rows if row["dice_mean"] is not None and row["dice_mean"] == best_score]
    return {**(rows[-1] if rows else {}), "best_dice_mean": best_score, "best_epoch": (best_epochs or [None])[0]}


def main():
    hp = hyperparameters.from_command_line()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        run_torchrun_process(train, hp)  # ends the process
    try:
        train(hp)
    except (OSError, ValueError) as error:  # missing or bad files, a full disk: one line, no traceback
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()

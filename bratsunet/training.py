"""The parts of training: the network as training runs it (DDP, torch.compile), the optimizer and its learning-rate
schedule, one epoch of optimizer steps, validation on whole volumes, and resuming from checkpoint_last.pt.
train.py puts them together."""
import datetime
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from bratsunet import augmentation, checkpoints, conventions, inference, losses, metrics, network
from bratsunet.console import progress_bar
from bratsunet.devices import on_rank0, run_settings
from bratsunet.files import output_folder

# what a run writes; the first three hold a trained run
RUN_FILES = ("checkpoint_last.pt", "checkpoint_best.pt", "checkpoint_final.pt", "metrics.csv", "curves.png")


# How long a process waits for the others in a collective before it fails: long enough for the slowest
# process's share of validation, short enough that a dead process cannot hang the others for good.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=10)


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
    """AdamW, or nnU-Net's SGD with Nesterov momentum; weight decay as hp.weight_decay. Fused: the optimizer skips a
    step with non-finite gradients on the device (found_inf), so the host never waits to decide it."""
    params = [p for p in net.parameters() if p.requires_grad]
    if hp.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=hp.learning_rate, momentum=hp.momentum, nesterov=True,
                                    weight_decay=hp.weight_decay, fused=True)
        if hp.momentum:  # a skipped first step would leave fused SGD's momentum uninitialized; zeros: the same step
            for p in params:
                optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
        return optimizer
    return torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay, fused=True)


# Steps between reads of the running loss for the progress bar: each read waits for the GPU to finish its queue.
LOSS_READ_EVERY = 25


def optimizer_step(optimizer, scaler, params, hp):
    """Unscale, clip and step; the optimizer skips the step on the device where the gradients are not finite ->
    whether it did, a bool tensor on the device, unread."""
    scaler.unscale_(optimizer)  # clip the true gradient, not the fp16-scaled one
    norm = torch.nn.utils.clip_grad_norm_(params, hp.grad_clip if hp.grad_clip > 0 else math.inf)
    skipped = ~torch.isfinite(norm)  # the same in every process: the gradients are all-reduced
    if scaler.is_enabled():
        scaler.step(optimizer)  # its own check of the gradients, passed to the fused optimizer
    else:
        optimizer.found_inf = skipped.float()
        optimizer.step()
        del optimizer.found_inf
    scaler.update()
    return skipped


def train_epoch(train_model, batches, optimizer, scheduler, scaler, loss_fn, hp, device, dtype, epoch,
                world_size, main_process):
    """hp.steps_per_epoch optimizer steps -> (mean loss of the steps taken, over all processes; skipped steps).

    Nothing is read from the device per step: the loss sums and which steps were skipped stay there and are read
    once, at the end of the epoch (and the running loss for the progress bar every LOSS_READ_EVERY steps)."""
    channels_last = run_settings(hp.precision, hp.channels_last, device)[2]
    params = [p for p in train_model.parameters() if p.requires_grad]
    totals = torch.zeros(2, device=device)  # sum of the losses of the steps taken, their count
    bad = torch.zeros((hp.steps_per_epoch, 2), device=device)  # per step: loss not finite, step skipped
    bar = progress_bar(total=hp.steps_per_epoch, description=f"epoch {epoch}/{hp.epochs}", disable=not main_process)
    start, shown = time.perf_counter(), "..."
    for step, batch in enumerate(batches, start=1):
        image, labels = augmentation.to_device(batch, device, hp.patch_size)  # (B, C, px, py, pz), (B, px, py, pz)
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = train_model(image)  # (B, C_out, px, py, pz); a list of them with deep supervision
        logits = [x.float() for x in logits] if isinstance(logits, list) else logits.float()
        batch_loss = loss_fn(logits, labels)  # float32 scalar, outside autocast
        finite = torch.isfinite(batch_loss.detach())
        # a loss that is not finite makes every gradient NaN: all-reduced, they make every process skip the step
        scaler.scale(batch_loss * torch.where(finite, 1.0, math.nan)).backward()
        skipped = optimizer_step(optimizer, scaler, params, hp)
        totals += torch.stack([torch.where(skipped, 0.0, batch_loss.detach()), (~skipped).float()])
        bad[step - 1] = torch.stack([~finite, skipped]).float()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()  # skipped or not: the schedule follows the step count, also after a resume
        if not bar.disable and step % LOSS_READ_EVERY == 1:
            shown = f"{(totals[0] / totals[1]).item():.4f}"
        rate = step * hp.batch_size * world_size / (time.perf_counter() - start)
        bar.set_postfix(loss=shown, patches_per_s=f"{rate:.1f}", refresh=False)  # update() draws
        bar.update()
    bar.close()
    record = torch.cat([totals, bad.flatten()]).cpu().double()  # the epoch's one wait for the device
    if world_size > 1:
        dist.all_reduce(record)  # in CPU memory: Gloo's part of the group
    loss_sum, loss_count, *flags = record.tolist()
    for index in range(hp.steps_per_epoch):
        if flags[2 * index + 1] and main_process:
            kind = "loss" if flags[2 * index] else "gradients"
            print(f"non-finite {kind} at epoch {epoch} step {index + 1}: skipped")
    return loss_sum / loss_count if loss_count else math.nan, sum(bool(f) for f in flags[1::2])


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
        probabilities = inference.predict_case(net, image.to(device), no_tta, hp.target)  # as predict.py does
        labels = losses.probabilities_to_labels(probabilities, hp.target).cpu().numpy()  # (x, y, z)
        dice = metrics.dice_per_region(labels, truth.numpy())
        first = labels if index == 0 else first
        results.append((index, [dice[region] for region in conventions.REGION_NAMES],
                        metrics.accuracy(labels, truth.numpy())))
    net.train()
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, results)
        results = [result for part in gathered for result in part]
    results.sort()
    dice = np.mean([dice for _, dice, _ in results], axis=0)  # (3,) WT, TC, ET
    row = {f"dice_{region}": float(value) for region, value in zip(conventions.REGION_NAMES, dice)}
    return {**row, "dice_mean": float(dice.mean()), "accuracy": float(np.mean([a for _, _, a in results]))}, first


def continue_schedule(optimizer, scheduler, done, hp):
    """A resumed run's learning rates: lr_factor of the current settings from the first step after epoch `done`,
    times the current learning_rate. A raised epochs stretches the rest of the schedule over the new total (the
    scheduler would otherwise keep its old base rate and the optimizer the old schedule's last rate, near 0); a
    changed learning_rate applies from now on. With unchanged settings: the rates the run would have had."""
    step = done * hp.steps_per_epoch
    scheduler.last_epoch = step
    scheduler.base_lrs = [hp.learning_rate] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group["initial_lr"] = hp.learning_rate
        group["lr"] = hp.learning_rate * lr_factor(step, hp)  # as LambdaLR computes it


def resume_state(hp, net, optimizer, scheduler, scaler, main_process, split):
    """Restore run_dir/checkpoint_last.pt in place -> (completed epochs, best score, metrics rows). Under torchrun
    process 0 reads it and gives it to the others."""
    path = hp.run_dir / "checkpoint_last.pt"
    checkpoint = on_rank0(lambda: checkpoints.load_checkpoint(path) if path.is_file() else None)
    if checkpoint is None:
        if main_process:
            print(f"resume: True, but there is no {path}: starting from scratch")
        return 0, None, []
    missing = [key for key in ("model_args", "model", "optimizer", "scheduler", "epoch", "rng", "metrics")
               if key not in checkpoint]
    if missing:
        raise ValueError(f"{path}: not a checkpoint of train.py (no {', '.join(missing)}); train in another run_dir")
    weights = checkpoints.strip_wrapper_prefixes(checkpoint["model"])
    problems = checkpoints.describe_mismatch(net, weights)
    if checkpoint["model_args"] != network.model_args(hp) or problems:
        differ = checkpoints.describe_args_difference(checkpoint["model_args"], network.model_args(hp))
        raise ValueError(f"{path}: the network was trained with other settings ({differ or 'the same model_args'}); "
                         f"weights that do not fit: {problems or 'none'}; set them back or train in another run_dir")
    if checkpoint.get("split", split) != split:
        raise ValueError(f"{path}: trained on other cases than fold {hp.fold} of dataset.json now holds (it was split "
                         "again); train this fold in a new run_dir")
    net.load_state_dict(weights)
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    continue_schedule(optimizer, scheduler, checkpoint["epoch"], hp)
    if checkpoint["scaler"] and scaler.is_enabled():  # empty when saved without fp16 (e.g. on a CPU)
        scaler.load_state_dict(checkpoint["scaler"])
    checkpoints.set_rng_state(checkpoint["rng"])
    if main_process:
        before = checkpoint["hyperparameters"]
        changed = [f"{k} {before.get(k)} -> {v}" for k, v in hp.to_dict().items()
                   if k != "resume" and before.get(k) != v]
        schedule = [key for key in ("epochs", "learning_rate", "lr_schedule", "warmup_epochs", "steps_per_epoch")
                    if before.get(key) != getattr(hp, key)]
        rate = f"; the learning rate continues at {optimizer.param_groups[0]['lr']:.3g}: {hp.lr_schedule} over " \
               f"{hp.epochs} epochs from learning_rate {hp.learning_rate:g}" if schedule else ""
        print(f"resuming {path} after epoch {checkpoint['epoch']}" + f"; changed: {', '.join(changed)}" * bool(changed)
              + rate)
    return checkpoint["epoch"], checkpoint["best_score"], checkpoint["metrics"]


def start_run_dir(run_dir, hp):
    """Create run_dir and check it is writable before any work. A trained run in it is continued
    (resume=True), started over (overwrite=True: its files are removed) or refused."""
    output_folder(run_dir, "run_dir")
    trained = [name for name in RUN_FILES[:3] if (run_dir / name).is_file()]
    if trained and not hp.resume:
        if not hp.overwrite:
            raise ValueError(f"{run_dir} holds a trained run ({trained[0]}): resume=True continues it, "
                             "overwrite=True starts it over, or set another run_dir")
        for name in (*RUN_FILES, checkpoints.ONNX_NAME):  # an old export stands for the old run's network
            (run_dir / name).unlink(missing_ok=True)


def check_run_source(run_dir, prepared_dir):
    """ValueError, naming both folders and the setting to change, when run_dir holds a run trained on another
    prepared_dir: said before any work, and before overwrite=True could remove another dataset's run."""
    for path in (run_dir / name for name in RUN_FILES[:2]):
        try:  # mmap: only the settings are read, not the weights
            trained = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["hyperparameters"]
            trained = trained["prepared_dir"]
        except Exception:  # none, or unreadable (resume says so; overwrite starts over)
            continue
        if Path(trained) != Path(prepared_dir):
            raise ValueError(f"{run_dir} holds a run trained on prepared_dir {trained}, not on {prepared_dir}: set "
                             "run_dir to a folder of its own for this data (docs/settings.md: folders of one's own), "
                             "or prepared_dir back")
        return


def build_for_training(hp, device, world_size, main_process):
    """-> (the network, what training calls: the network wrapped for DDP and torch.compile as asked)."""
    torch.manual_seed(hp.seed)  # the same initial weights in every process and every run
    random.seed(hp.seed)  # and the same global random states, which checkpoints keep: equal checkpoints per seed
    np.random.seed(hp.seed)
    net = network.build_model(hp).to(device)
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

"""Train the 3D U-Net on random patches; validate on whole volumes; checkpoint and plot every save_every epochs.

    python train.py                                  # settings from hyperparameters.txt
    python train.py epochs=5 batch_size=1 resume=True
    python train.py fold=2                           # with num_folds > 1: validate on fold 2, train on the others
    torchrun --nproc_per_node=4 train.py             # DistributedDataParallel, one process per GPU

Writes to run_dir (with num_folds > 1: run_dir/fold_K): checkpoint_last.pt (every save_every epochs and at
the end: what resume continues), checkpoint_best.pt (best mean validation Dice) and checkpoint_final.pt (the
last epoch: what predict.py and cross-validation use); through training_log.py metrics.csv (a row per epoch),
curves.png (with checkpoint_last.pt) and, with tensorboard: True, tensorboard/; at the end the validation
cases predicted with the final weights into validation/ (the out-of-fold predictions crossval.py reads);
log.txt, what the console showed (a resumed run appends), and settings.txt, the settings it ran with
(`python train.py --hp settings.txt` runs it again). Under torchrun batch_size is per process, the global batch
is batch_size * processes, and a step sees the same patches as one process with that global batch.
"""
import contextlib
import os
import shutil
import time

import torch

from bratsunet import (augmentation, checkpoints, console, inference, losses, network, settings_text, training,
                       training_log)
from bratsunet.devices import process_device, run_settings, run_torchrun_process
from bratsunet.files import atomic_write, sole_writer
from bratsunet.loader import EpochSampler, PatchDataset, VolumeDataset, foreground_classes, start_loader
from bratsunet.manifest import check_prepared_settings, fold_cases, fold_dir, labels_convention, read_manifest

# What train() reads: keys, and groups of hyperparameters.txt for all their keys (--help lists them).
SETTINGS = ("prepared_dir", "run_dir", "channel_names", "data_format", "crop_margin", "num_folds", "seed", "model",
            "loss", "training", "overwrite", "sw_overlap", "sw_batch_size", "tta_mirror", "backend")


def train(hp):
    """Train fold hp.fold per hp (continuing its checkpoint_last.pt when hp.resume), then predict its validation
    cases -> the last epoch's metrics row plus best_dice_mean and best_epoch. The main process keeps its console
    in the fold's log.txt and the settings in its settings.txt."""
    rank, world_size, device = process_device(hp.device, training.PROCESS_GROUP_TIMEOUT)
    precision = run_settings(hp.precision, hp.channels_last, device)  # (autocast dtype, loss scaling, channels_last)

    manifest = read_manifest(hp.prepared_dir, hp.data_format)
    check_prepared_settings(manifest, hp)  # channels, crop margin and format come from the prepared data
    network.check_patch_size(hp)
    train_names, val_names = fold_cases(manifest, hp)
    split = {"fold": hp.fold, "train": train_names, "val": val_names}  # kept in the checkpoints: resume checks it
    fold_hp = hp.replace(run_dir=fold_dir(hp))  # settings.txt keeps hp: the run_dir given, not the fold's
    training.check_run_source(fold_hp.run_dir, fold_hp.prepared_dir)  # another dataset's run: refused before any work
    # one training per run folder: a second one stops here, naming it (only process 0 writes)
    with sole_writer(fold_hp.run_dir, "run_dir") if rank == 0 else contextlib.nullcontext(), \
            console.KeptConsole(enabled=rank == 0) as kept:
        return train_fold(fold_hp, device, precision, rank, world_size, split, kept, hp)


def train_fold(hp, device, precision, rank, world_size, split, kept, ran_with):
    """The training of train(), in the run folder hp.run_dir it holds, on the cases of split; its console kept by
    kept, the settings ran_with written beside it."""
    main_process, train_names, val_names = rank == 0, split["train"], split["val"]
    dtype, use_scaler, channels_last = precision
    disk_labels = list(labels_convention(read_manifest(hp.prepared_dir)).disk_labels)  # msd, nnunet: dataset.json's
    patches = PatchDataset(hp.prepared_dir, train_names, hp.patch_size, hp.foreground_fraction, hp.augment, hp.seed,
                           hp.steps_per_epoch * hp.batch_size * world_size,
                           augmentation.runs_on_device(hp.augment, hp.augment_on, device), hp.patch_sampling,
                           hp.batch_size * world_size, foreground_classes(hp.patch_sampling, hp.data_format, hp.target))
    volumes = VolumeDataset(hp.prepared_dir, val_names) if val_names else None
    sampler = EpochSampler(hp.steps_per_epoch, hp.batch_size, rank, world_size)
    net, train_model = training.build_for_training(hp, device, world_size, main_process)
    loss_fn = losses.make_loss(hp)
    optimizer = training.make_optimizer(net, hp)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: training.lr_factor(step, hp))
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    done, best_score, rows = 0, None, []
    if hp.resume:
        done, best_score, rows = training.resume_state(hp, net, optimizer, scheduler, scaler, main_process, split)
    if main_process:
        training.start_run_dir(hp.run_dir, hp)
        kept.keep_in(hp.run_dir / "log.txt", append=hp.resume)
        settings_text.write_settings_file(ran_with, hp.run_dir / "settings.txt", "train.py")
        print(f"training on {device} x {world_size} process(es), {dtype or torch.float32}"
              f"{' with loss scaling' if use_scaler else ''}{', channels_last' * channels_last}, "
              f"{network.count_parameters(net):,} parameters, "
              f"{len(train_names)} training / {len(val_names)} validation cases"
              f"{f' (fold {hp.fold} of {hp.num_folds})' * (hp.num_folds > 1)}, global batch "
              f"{hp.batch_size * world_size}, epochs {done + 1}..{hp.epochs}")
        if volumes is None:
            print("no validation cases: checkpoint_best.pt is the latest epoch saved")
        if done >= hp.epochs:
            print(f"{hp.run_dir} has trained {done} epochs already; raise epochs to train on")
    show = world_size == 1 and training_log.interactive_plots()
    log = training_log.TrainingLog(hp, done, show) if main_process else None
    sampler.set_epoch(done + 1)
    loader = start_loader(patches, sampler, hp.batch_size, hp.num_workers, device)

    for epoch in range(done + 1, hp.epochs + 1):
        start, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]  # the epoch's first learning rate
        sampler.set_epoch(epoch)
        train_loss, skipped = training.train_epoch(train_model, loader, optimizer, scheduler, scaler, loss_fn, hp, device,
                                          dtype, epoch, world_size, main_process)
        diverged = network.non_finite_weights(net)  # the same in every process: the gradients are all-reduced
        if diverged:
            raise ValueError(f"epoch {epoch}: the weights became NaN or Inf ({', '.join(diverged[:3])}); stopped "
                             f"before saving them, {hp.run_dir} keeps the last good checkpoints; lower learning_rate")
        row = {"epoch": epoch, "train_loss": train_loss, "lr": lr, "skipped_steps": skipped,
               **dict.fromkeys(("dice_WT", "dice_TC", "dice_ET", "dice_mean", "accuracy"))}
        labels = None
        if volumes is not None and (epoch % hp.val_every == 0 or epoch == hp.epochs):
            metrics, labels = training.validate(net, volumes, hp, device, rank, world_size)
            row.update(metrics)
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        improved = volumes is None or (row["dice_mean"] is not None and
                                       (best_score is None or row["dice_mean"] > best_score))
        best_score = row["dice_mean"] if improved else best_score
        if main_process:
            log.to_tensorboard(row, volumes, labels)
            state = {"model_args": network.model_args(hp), "model": net.state_dict(), "epoch": epoch,
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(), "best_score": best_score, "metrics": rows, "rng": checkpoints.rng_state(),
                     "hyperparameters": hp.to_dict(), "world_size": world_size, "split": split,
                     "disk_labels": disk_labels}
            saved = epoch % hp.save_every == 0 or epoch == hp.epochs  # the GPUs wait while these are written
            if saved:
                checkpoints.save_checkpoint(state, hp.run_dir / "checkpoint_last.pt")
            if epoch == hp.epochs:
                checkpoints.save_checkpoint(state, hp.run_dir / checkpoints.FINAL_CHECKPOINT)
            if improved and (volumes is not None or saved):
                checkpoints.save_checkpoint(state, hp.run_dir / "checkpoint_best.pt")
            log.write(rows, improved and volumes is not None, device, curves=saved)
    if main_process:
        log.close()
        final = hp.run_dir / checkpoints.FINAL_CHECKPOINT
        if done >= hp.epochs and not final.is_file():  # a run finished before final checkpoints were written
            atomic_write(final, lambda tmp: shutil.copyfile(hp.run_dir / "checkpoint_last.pt", tmp))
    if val_names:  # the out-of-fold predictions, with the final weights; redone when this call trained
        inference.predict_validation(hp, val_names, net, rows[-1]["epoch"] if rows else done, rank, world_size,
                                     overwrite=done < hp.epochs)
    best_epochs = [row["epoch"] for row in rows if row["dice_mean"] is not None and row["dice_mean"] == best_score]
    return {**(rows[-1] if rows else {}), "best_dice_mean": best_score, "best_epoch": (best_epochs or [None])[0]}


def main():
    hp = settings_text.from_command_line(__doc__, SETTINGS)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        run_torchrun_process(train, hp)  # ends the process
    try:
        train(hp)
    except (OSError, ValueError) as error:  # missing or bad files, a full disk: one line, no traceback
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()

"""Sweeps of `fssjax.train.train_and_evaluate` on submitit (local, Slurm) and TPU VMs.

  python -m launch.run --config=configs/hsnet_coco.py:demo --sweep --backend=local \\
      --workdir=runs/NAME
  python -m launch.collect runs/NAME

See docs/sweeps.md. Modules:
  sweeps   the points of a sweep (a config file's `sweep()` / big_vision `get_hyper(hyper)`,
           a sweep file, `--override k=v`), strict overrides on the ConfigDict, run names;
  job      `TrainRun`, the submitit-checkpointable callable every backend runs;
  backends local (submitit LocalExecutor), slurm (submitit job arrays), tpu_vm (gcloud ssh
           on every worker of a slice);
  results  reading a run's results files;
  collect  one table (CSV, Markdown, TensorBoard hparams) over the runs of a sweep.
"""

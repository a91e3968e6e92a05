"""One-shot GPU check: does CS-KD train correctly on this GPU, through the real trainer, and how fast.

Written for a lent GPU machine (one H100/H200, torch installed, a timm of unknown age, this repository
not pip-installed, no network, no DALI, about 15 minutes in all). Synthetic data only. Run it from the
repository root; ``--budget-s`` (default 330) keeps the whole run under 6 minutes on an H100 so that a
rerun fits: a row whose estimate no longer fits is SKIPped and marked so.

    python3 benchmarks/gpu_check.py --output DIR     # GPU: ResNet-50, 224 px
    python3 benchmarks/gpu_check.py --preflight-only # the 20-second environment check alone
    python3 benchmarks/gpu_check.py --smoke          # CPU: every row at toy sizes (the test)

Preflight (about 20 s, before any row): python, torch, timm >= 1.0.29 with what timm_cskd uses from it
(timm.task, ...), CUDA, free GPU memory and disk, and whether torch.compile builds a kernel here (triton
and a C compiler). A missing essential stops the run at once, naming it; a missing compiler only SKIPs
the compiled rows.

The machine's timm too old? Bring one along in a folder the device call carries (an ignored path):

    echo /.whl/ >> .git/info/exclude        # here, in the repository root, once
    python3 -m pip download --no-deps --only-binary=:all: -d .whl timm==1.0.31
    # on the GPU machine (carry [".whl"]): install it beside the image's packages, then run
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/timm-*.whl \\
        && export PYTHONPATH=/tmp/site && python3 benchmarks/gpu_check.py --output $OUT

Rows, in order (each PASS/FAIL/SKIP for checks, ok/FAIL/SKIP for measurements, with what it measured):
bf16 CS-KD steps, fp16 GradScaler, channels_last, DDP 1-process, evaluate (the loss and the methods on
the device); trainer SIGTERM + resume, trainer host syncs, loader vs GPU step, trainer 2 ranks (the real
Trainer on a generated ImageFolder: ResNet-50, --amp --amp-dtype float16 --channels-last --model-ema, the
torch backend with loader workers); torch.compile (one compiled model, shared by the compiled throughput
rows); train eager/compiled CE, CS-KD anchor, CS-KD paired (throughput); loss 256x1000 and 1024x1000.

Only --output DIR comes back from the GPU machine: gpu_check.md and gpu_check.json (the table and the
raw numbers, rewritten after every row, so a run killed part-way keeps the rows it finished) and
trainer_logs.txt (the last lines of every trainer process). Exit status 1 if any row FAILed, 2 if the
preflight did.
"""

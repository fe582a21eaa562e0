#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one call of a lent accelerator machine (at most 570 s: the steps' limits).
#
# That machine has PyTorch with CUDA, h5py, scipy, scikit-image, matplotlib and tqdm, but not Hydra. Once per
# session, here, in the repository's root (wheels of pure Python, the versions pyproject.toml admits):
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl hydra-core==1.3.8 omegaconf==2.3.1
#   python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3
#
# then run `bash scripts/device_check.sh` there with `.whl` carried and timeout_s 600 (the steps' limits add
# up to 570 s). Every step's output goes to $OUT (default outputs/device_check) and to the terminal; a step
# that fails or runs past its limit does not stop the next. Steps:
#
#   1. scripts/device_agreement.py: float64 runs on the CPU and the GPU side by side, final ELBOs compared;
#   2. scripts/bench_estep.py: one whole-data E-step evaluation (204,800 x 100) against the device's floor,
#      score_dictionary at the paper's size, one unannealed EM epoch with whole-data blocks;
#   3. scripts/bench_patches.py: experiment=patches_em at the paper's size with whole-data E-step blocks —
#      time per epoch, peak device memory, ELBO, localisation;
#   4. scripts/bench_amortized.py: three timed epochs of experiment=patches_amortized;
#   5. on a machine with two or more GPUs only (NCCL will not run two ranks on one GPU): a 2-rank data-parallel
#      EM and Adam runs with the NCCL backend, one GPU per rank (at most 120 s more than the 570).
#
# DEVICE=cpu runs the same steps on the CPU (a check of this script; steps 2-4 then run past their limits).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/device_check}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

step() {  # step NAME SECONDS COMMAND...: run COMMAND for at most SECONDS, its output to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "== $name: exit status ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}

step 0_environment 30 python3 -c "
import torch, sparse_elbo
print('sparse_elbo', sparse_elbo.__version__, '| torch', torch.__version__, '| CUDA', torch.version.cuda)
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), f'{torch.cuda.mem_get_info()[1] / 2**30:.0f} GiB')"
step 1_agreement 150 python3 scripts/device_agreement.py --device "$DEVICE"
step 2_estep 90 python3 scripts/bench_estep.py --device "$DEVICE" --n-patches 204800 trainer.driver.block_size=null
step 3_patches_em 180 python3 scripts/bench_patches.py --device "$DEVICE" --reference-fraction 0 --progress \
    trainer.driver.block_size=null
step 4_amortized 120 python3 scripts/bench_amortized.py --time-epochs 3 experiment=patches_amortized "device=$DEVICE"
if [ "$DEVICE" = cuda ] && [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -ge 2 ]; then
    step 5_nccl 60 python3 -m torch.distributed.run --standalone --nproc_per_node=2 -m sparse_elbo.train \
        trainer=em dataset.n_data=4000 trainer.max_epochs=3 device=cuda "hydra.run.dir=$OUT/nccl_em"
    step 5_nccl_adam 60 python3 -m torch.distributed.run --standalone --nproc_per_node=2 -m sparse_elbo.train \
        trainer=adam posterior=amortized objective=sampled dataset.n_data=4000 trainer.max_epochs=3 device=cuda \
        "hydra.run.dir=$OUT/nccl_adam"
else
    echo "== 5_nccl: skipped (one GPU: NCCL runs one rank per GPU)"
fi

"""Cluster cost model for training Llama-2-family transformers with tensor, pipeline and data parallelism.

    python -m train.plan --model llama2-70b --gpu A100-80 --nodes 16 --tp 8 --pp 8 --dp 2 \\
        --micro-batch 2 --global-batch 512 --seq-len 4096 --recompute selective
    python -m train.plan --config train/configs/meditron-70b.toml --gpu H100 --nodes 16
    python -m train.plan --model llama2-70b --gpu H100 --nodes 8 --global-batch 512 --search
    python -m train.plan --validate            # published runs, predicted against measured

The model walks one training step the way a Megatron-style 1F1B pipeline executes it:

* per transformer layer and micro-batch (cost.py): GEMM FLOPs at a fixed fraction of the GPU's
  peak, attention FLOPs at the attention kernel's fraction, element-wise traffic (norms,
  residual adds, rotary, SwiGLU/GeLU, unfused softmax) at a fraction of HBM bandwidth, and the
  tensor-parallel collectives over NVLink (comm.py); activation recomputation adds its share of
  the forward again;
* the slowest pipeline stage (the one holding the LM head) sets the pace: a step takes
  (m + (p - 1) / v) micro-batch slots, the (p - 1) / v extra being the pipeline bubble
  (step.py);
* then the data-parallel gradient reduction over InfiniBand and the memory-bound Adam step;
* memory per GPU on the most loaded stage (memory.py).

Shapes, parameter counts and the MFU formula come from model.LlamaConfig (shapes.py); the peak
FLOP/s table and `mfu` are train.metrics'. Every other number is a physical constant (data
sheets) or one of a handful of efficiencies shared by all runs (hardware.py); each is documented
where it is defined, with its source. There are no per-run corrections: runs.PUBLISHED_RUNS lists
each run's own published layout and nothing else, and `--validate` (and tests/train/test_plan.py)
checks every prediction against the published figure.

Units: seconds, bytes, FLOP; memory is reported in GiB (2**30 bytes, as nvidia-smi and
torch.cuda report it) under the name `memory_gb_per_gpu`.
"""
from train.metrics import mfu

from .cli import main
from .hardware import GPU, GPUS, Cluster, GiB
from .layout import OVERLAP, RECOMPUTE, PlanLayout, validate
from .memory import Memory
from .step import Prediction, predict, predict_layout, search
from .runs import PUBLISHED_RUNS, PublishedRun, validation_table
from .shapes import ARCHITECTURES, Architecture, get_architecture

__all__ = ["ARCHITECTURES", "Architecture", "Cluster", "GPU", "GPUS", "GiB", "Memory", "OVERLAP", "PUBLISHED_RUNS",
           "PlanLayout", "Prediction", "PublishedRun", "RECOMPUTE", "get_architecture", "main", "mfu", "predict",
           "predict_layout", "search", "validate", "validation_table"]

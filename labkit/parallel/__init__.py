"""Running a model that outgrows one device: tensor and pipeline parallelism, offloading.

    from labkit import parallel
    folder = parallel.write_folder(model, "/tmp/smollm2")          # one safetensors file per layer
    out = parallel.launch(parallel.tensor_parallel_forward, 3, folder, ids)   # 3 processes, rank 0's result
    ranks = parallel.launch(parallel.pipeline_forward, 3, folder, ids, (1, 4), return_all=True)
    parallel.offload(model, folder)                                  # layers read from disk per use

launch.py    start the ranks (torch.distributed, gloo on CPU / NCCL on GPUs), clean shutdown, errors by rank
store.py     the model folder every rank and offloaded layer reads (safetensors, memory-mapped, slices)
comm.py      all-reduce / send / recv wrappers that count bytes and time
tensor.py    Megatron tensor parallelism: column- and row-parallel linears, heads split by KV group
pipeline.py  GPipe pipeline parallelism: stages, micro-batches, the bubble
offload.py   decoder layers in CPU memory or on disk, fetched per use with prefetch
"""

from .comm import CommLog, ring_bytes
from .launch import RankFailed, free_port, launch
from .offload import OffloadedLayer, load_offloaded, offload
from .pipeline import (
    balanced_sizes,
    bubble_fraction,
    gpipe_forward,
    layer_macs,
    load_stage,
    measured_bubble,
    pipeline_forward,
    split_layers,
)
from .store import check_file, check_folder, load_folder, write_folder
from .tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    allowed_world_sizes,
    check_plan,
    check_world_size,
    comm_per_token,
    heads_of,
    layer_slices,
    linear_slices,
    load_tensor_parallel,
    tensor_parallel,
    tensor_parallel_forward,
    tensor_plan,
)

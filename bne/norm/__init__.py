from bne.norm.bgn import BatchGroupNorm2d
from bne.norm.cbn import CrossIterationBatchNorm2d
from bne.norm.dsbn import (
    MEAN_DOMAIN,
    DomainBatchNorm2d,
    SyncBatchNorm2d,
    convert_sync_batchnorm,
    distributed_refusal,
    domain_norm_layers,
    domain_route,
    sync_chunk_stats,
    world_size,
)
from bne.norm.iebn import InstanceEnhancementBatchNorm2d
from bne.norm.mbn import MemorizedBatchNorm2d, double_forward
from bne.norm.proxynorm import ProxyNorm2d
from bne.norm.simplex import SimplexBatchNorm2d

__all__ = [
    "MEAN_DOMAIN",
    "BatchGroupNorm2d",
    "CrossIterationBatchNorm2d",
    "DomainBatchNorm2d",
    "InstanceEnhancementBatchNorm2d",
    "MemorizedBatchNorm2d",
    "ProxyNorm2d",
    "SimplexBatchNorm2d",
    "SyncBatchNorm2d",
    "convert_sync_batchnorm",
    "distributed_refusal",
    "domain_norm_layers",
    "domain_route",
    "double_forward",
    "sync_chunk_stats",
    "world_size",
]

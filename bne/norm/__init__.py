from bne.norm.dsbn import MEAN_DOMAIN, DomainBatchNorm2d, domain_norm_layers, domain_route

__all__ = ["MEAN_DOMAIN", "DomainBatchNorm2d", "domain_norm_layers", "domain_route"]

from histosynth.pipelines.nasdm import NASDMPipeline

__all__ = ["NASDMPipeline"]

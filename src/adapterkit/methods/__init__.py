"""Built-in adapter methods; importing this package registers them all."""

from adapterkit.methods.bitfit import BitFitConfig
from adapterkit.methods.bottleneck import BottleneckConfig
from adapterkit.methods.fusion import FusionConfig, add_fusion
from adapterkit.methods.ia3 import IA3Config
from adapterkit.methods.lora import LoraConfig
from adapterkit.methods.prefix import PrefixTuningConfig
from adapterkit.methods.prompt import PromptTuningConfig

__all__ = ["LoraConfig", "BottleneckConfig", "IA3Config", "BitFitConfig",
           "PrefixTuningConfig", "PromptTuningConfig", "FusionConfig", "add_fusion"]

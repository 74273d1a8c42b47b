"""Speaker encoder: CAM++ x-vectors trained with additive angular margin softmax."""

from cosy.speaker.ecapa import ECAPAConfig, ECAPATDNN
from cosy.speaker.loss import AAMConfig, AAMSoftmax
from cosy.speaker.model import CAMPPlus, CAMPPlusConfig, SpeakerConfig, SpeakerModel, build_encoder

__all__ = ["AAMConfig", "AAMSoftmax", "CAMPPlus", "CAMPPlusConfig", "ECAPAConfig", "ECAPATDNN", "SpeakerConfig",
           "SpeakerModel", "build_encoder"]

"""Speaker encoder: CAM++ x-vectors trained with additive angular margin softmax."""

from cosy.speaker.loss import AAMConfig, AAMSoftmax
from cosy.speaker.model import CAMPPlus, CAMPPlusConfig, SpeakerConfig, SpeakerModel

__all__ = ["AAMConfig", "AAMSoftmax", "CAMPPlus", "CAMPPlusConfig", "SpeakerConfig", "SpeakerModel"]

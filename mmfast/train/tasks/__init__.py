"""Tasks: what the trainer asks of each training paradigm (see base.Task). `task:` in a recipe names one."""
from mmfast.train.tasks.audio_contrastive import AudioContrastiveTask
from mmfast.train.tasks.base import Task
from mmfast.train.tasks.caption_lm import CaptionLMTask
from mmfast.train.tasks.contrastive import ContrastiveTask
from mmfast.train.tasks.llava import LlavaTask
from mmfast.train.tasks.masked_audio import MaskedAudioTask
from mmfast.train.tasks.masked_image import MaskedImageTask
from mmfast.train.tasks.masked_text import MaskedTextTask
from mmfast.train.tasks.masked_video import MaskedVideoTask
from mmfast.train.tasks.unified import UnifiedTask
from mmfast.train.tasks.video_contrastive import VideoContrastiveTask

TASKS = {"contrastive": ContrastiveTask, "audio_contrastive": AudioContrastiveTask, "caption_lm": CaptionLMTask,
         "llava": LlavaTask, "mae": MaskedImageTask, "video_contrastive": VideoContrastiveTask,
         "videomae": MaskedVideoTask, "audiomae": MaskedAudioTask, "mlm": MaskedTextTask,
         "unified": UnifiedTask}


def build_task(config, placement=None) -> Task:
    if config.task not in TASKS:
        raise ValueError(f"config: task must be one of {sorted(TASKS)}, got {config.task!r}")
    return TASKS[config.task](config, placement)


__all__ = ["TASKS", "AudioContrastiveTask", "CaptionLMTask", "ContrastiveTask", "LlavaTask", "MaskedAudioTask",
           "MaskedImageTask", "MaskedTextTask", "MaskedVideoTask", "Task", "UnifiedTask", "VideoContrastiveTask", "build_task"]

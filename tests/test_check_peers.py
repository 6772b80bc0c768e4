"""benchmarks/check_peers.py's swap plugin puts mmfast's drop-ins where the peers' own tests get
their classes (run in a subprocess: the swap changes the peer modules for the whole process)."""
import os
import subprocess
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
CHECK = {
    "timm": "from timm import create_model\n"
            "assert type(create_model('vit_tiny_patch16_224', pretrained=False, img_size=32).patch_embed).__module__"
            " == 'mmfast.nn.patch_embed'\n"
            "create_model('resnet18', pretrained=False)  # no patch embedding: left as it is\n",
    "open_clip": "import open_clip, open_clip.factory, open_clip.loss, mmfast\n"
                 "assert open_clip.factory.ClipLoss is open_clip.loss.ClipLoss is open_clip.ClipLoss is mmfast.nn.ClipLoss\n"
                 "assert open_clip.factory.SigLipLoss is mmfast.nn.SigLipLoss\n",
    "whisper": "import whisper, whisper.transcribe, mmfast.audio\n"
               "from whisper.audio import log_mel_spectrogram\n"
               "assert log_mel_spectrogram is whisper.log_mel_spectrogram is whisper.transcribe.log_mel_spectrogram"
               " is mmfast.audio.whisper_log_mel\n",
}


@pytest.mark.parametrize("peer", sorted(CHECK))
def test_the_swap_reaches_what_the_peers_tests_import(peer):
    pytest.importorskip({"timm": "timm", "open_clip": "open_clip", "whisper": "whisper"}[peer])
    script = f"import peer_swap\npeer_swap.pytest_configure(None)\n{CHECK[peer]}"
    environment = dict(os.environ, MMFAST_SWAP=peer, PYTHONPATH=os.pathsep.join([BENCHMARKS, os.getcwd()]))
    result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]

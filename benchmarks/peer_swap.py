"""pytest plugin of check_peers.py: with MMFAST_SWAP=<peer> set, swaps mmfast's drop-in into the peer
before its tests import it (loaded with -p peer_swap; without MMFAST_SWAP it does nothing)."""
import os


def _swap_open_clip():
    import open_clip
    import open_clip.factory
    import open_clip.loss

    import mmfast

    # create_loss (open_clip.factory) bound the classes when it was imported: swap them there too
    for namespace in (open_clip, open_clip.loss, open_clip.factory):
        namespace.ClipLoss, namespace.SigLipLoss = mmfast.nn.ClipLoss, mmfast.nn.SigLipLoss


def _swap_timm():
    import timm
    import timm.models
    import timm.models._factory as factory

    from mmfast.integrations.patch_embed import swap_patch_embedding

    original = factory.create_model

    def create_model(*args, **kwargs):
        model = original(*args, **kwargs)
        try:
            swap_patch_embedding(model)
        except ValueError:  # a model without a patch embedding stays as it is
            pass
        return model

    for namespace in (timm, timm.models, factory):
        namespace.create_model = create_model


def _swap_whisper():
    import whisper
    import whisper.audio
    import whisper.transcribe

    import mmfast.audio

    # transcribe bound the function when it was imported: swap it there too
    for namespace in (whisper, whisper.audio, whisper.transcribe):
        namespace.log_mel_spectrogram = mmfast.audio.whisper_log_mel


def pytest_configure(config):
    peer = os.environ.get("MMFAST_SWAP")
    if peer:
        {"open_clip": _swap_open_clip, "timm": _swap_timm, "whisper": _swap_whisper}[peer]()

import glob
import io

import torch
from PIL import Image


def test_gif_summary_is_written_and_decodes(tmp_path):
    """Read back the way TensorBoard's images dashboard reads it (the image plugin's data provider): the GIF, its
    size, step and the description shown with it."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from torch.utils.tensorboard import SummaryWriter

    from lightning_vidalign.utils import add_gif_summary, video_to_gif

    video = torch.rand(5, 3, 16, 24)
    gif = Image.open(io.BytesIO(video_to_gif(video)))
    assert gif.n_frames == 5 and gif.size == (24, 16)
    writer = SummaryWriter(str(tmp_path / "run"))
    add_gif_summary(writer, "val/samples/0_bikes.mp4", video, step=7, description="left: the real clip (bikes.mp4)")
    writer.close()
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(tmp_path))
    mux.Reload()
    provider, ctx = data_provider.MultiplexerDataProvider(mux, str(tmp_path)), context.RequestContext()
    tags = provider.list_blob_sequences(ctx, experiment_id="", plugin_name="images")["run"]
    assert list(tags) == ["val/samples/0_bikes.mp4"] and tags["val/samples/0_bikes.mp4"].description == "left: the real clip (bikes.mp4)"
    (event,) = provider.read_blob_sequences(ctx, experiment_id="", plugin_name="images", downsample=10)["run"]["val/samples/0_bikes.mp4"]
    width, height, image = (provider.read_blob(ctx, blob_key=b.blob_key) for b in event.values)
    assert event.step == 7 and (width, height) == (b"24", b"16")
    assert Image.open(io.BytesIO(image)).n_frames == 5


def test_sample_labels_name_the_clip_its_start_and_caption():
    from lightning_vidalign.module import VideoAlignModule

    batch = {"path": ["/data/a/bikes.mp4", "/data/b/dog"], "start": torch.tensor([0.0, 2.345]), "caption": ["cars pass", ""]}
    assert VideoAlignModule.sample_labels(batch, 2) == ['bikes.mp4 from 0.00 s: "cars pass"', "dog from 2.35 s"]
    assert VideoAlignModule.sample_labels({}, 1) == ["clip 0"]


def test_log_lines_during_a_live_progress_bar_go_through_rich(tmp_path):
    """On a terminal the live bar is redrawn in place; a log line written to the raw stream under it (Lightning's
    "max_steps reached", our LoRA path) was erased by the redraw. While the bar is live, stream handlers write
    through Rich's proxy (printed above the bar), and get their stream back when it stops."""
    import logging

    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from rich.file_proxy import FileProxy

    from lightning_vidalign.algorithms import SFT
    from lightning_vidalign.backbones import SVDBackbone
    from lightning_vidalign.datamodules import VideoClipDataModule
    from lightning_vidalign.progress import VidAlignProgressBar

    screen = io.StringIO()
    raw = io.StringIO()
    handler = logging.StreamHandler(raw)  # as Lightning's own handler: bound to a stream at import time
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(handler)
    seen = []

    class Look(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(handler.stream)
            logging.getLogger("lightning.pytorch.test").warning("a line under the bar")

    import sys

    stdout, stderr = sys.stdout, sys.stderr
    try:
        # what Rich does on a terminal: proxies for the streams, here with `raw` standing for the terminal's stream
        sys.stderr = raw
        bar = VidAlignProgressBar(console_kwargs={"file": screen, "force_terminal": True, "force_interactive": True, "width": 100})
        module = SFT(SVDBackbone(lora_rank=2, lora_alpha=2), val_num_videos=0, export_lora=False)
        trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False,
                            limit_val_batches=0, num_sanity_val_steps=0, callbacks=[bar, Look()], default_root_dir=str(tmp_path))
        trainer.fit(module, datamodule=VideoClipDataModule(batch_size=2, shot_detector="histogram"))
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        logger.removeHandler(handler)
    assert len(seen) == 2 and all(isinstance(s, FileProxy) and s.rich_proxied_file is raw for s in seen)
    assert handler.stream is raw  # given back when the bar stopped
    assert "a line under the bar" in screen.getvalue() and "a line under the bar" not in raw.getvalue()

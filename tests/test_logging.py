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

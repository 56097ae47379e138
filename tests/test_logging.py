import glob
import io

import torch
from PIL import Image


def test_gif_summary_is_written_and_decodes(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from lightning_vidalign.utils import add_gif_summary, video_to_gif

    video = torch.rand(5, 3, 16, 24)
    gif = Image.open(io.BytesIO(video_to_gif(video)))
    assert gif.n_frames == 5 and gif.size == (24, 16)
    writer = SummaryWriter(str(tmp_path))
    add_gif_summary(writer, "val/samples/0", video, step=7)
    writer.close()
    ea = EventAccumulator(glob.glob(str(tmp_path / "events*"))[0])
    ea.Reload()
    (event,) = ea.Images("val/samples/0")
    assert event.step == 7 and (event.width, event.height) == (24, 16)
    assert Image.open(io.BytesIO(event.encoded_image_string)).n_frames == 5

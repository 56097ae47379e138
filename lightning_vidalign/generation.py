"""Rollouts and their rewards for :class:`~lightning_vidalign.module.VideoAlignModule` (issue 33: out of the base
module): :meth:`GenerationMixin.generate_rollouts` / :meth:`GenerationMixin.score_rollouts` make a round's
:class:`~lightning_vidalign.rollouts.Rollouts` (GRPO family, SHIFT's buffer, DPO's on-policy pairs), the reward
callbacks' scoring (in a background thread with ``overlap_rewards``), training noise and the real clips of a batch."""
from __future__ import annotations

import torch
from torch import Tensor

from lightning_vidalign.rewards.base import repeat_batch, slice_batch
from lightning_vidalign.rollouts import Rollouts


class DeferredRewards:
    """A reward job of :meth:`GenerationMixin.submit_rewards` run in the training thread when its result is first asked
    for (serial scoring, ``overlap_rewards`` off): a handle like the overlapped path's futures."""

    def __init__(self, submit, videos: Tensor, names: list[str] | None, batch: dict | None):
        self._job = (submit, videos, names, batch)
        self._result = None

    def result(self) -> list[tuple]:
        """The chunk's ``[(callback, scores (n,), components), ...]``, scored on the first call (later calls return it).

        Raises:
            Whatever a reward callback raises, in the calling (training) thread.
        """
        if self._job is not None:
            submit, videos, names, batch = self._job
            self._job = None  # (the chunk's videos are released once scored)
            self._result = submit(videos, names, batch, background=False).result()
        return self._result


class GenerationMixin:
    """Rollout generation and reward scoring of a :class:`~lightning_vidalign.module.VideoAlignModule`. Settings it
    reads: ``backbone``, ``num_inference_steps``, ``guidance``, ``sampler``, ``overlap_rewards``, and on the algorithm
    ``rollout_batch_size`` and ``reward_names``."""

    _reward_pool = None  # the background scoring thread of overlap_rewards (made on first use)

    def score_rewards(self, videos: Tensor, names: list[str] | None = None, batch: dict | None = None, log: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        """Score videos with the trainer's reward callbacks.

        Args:
            videos: ``(N, T, 3, H, W)`` in ``[0, 1]``.
            names: reward callbacks to use (None: all; see :func:`find_rewards`).
            batch: passed to each callback's ``score``.
            log: log ``reward/<name>/mean`` and ``reward/<name>/std`` per callback, and the mean of each
                named part the callback reports (``score_components()``) as ``reward/<name>/<part>``.

        Returns:
            ``(total (N,), components)``: the sum of ``weight·score`` over the callbacks (fp32, on the
            videos' device) and each callback's unweighted score by name.

        Raises:
            ValueError: from :func:`find_rewards` when no (or a missing named) reward callback.
        """
        return self.collect_rewards([self.submit_rewards(videos, names, batch, background=False)], log=log)

    def submit_rewards(self, videos: Tensor, names: list[str] | None = None, batch: dict | None = None, background: bool | None = None):
        """Start scoring one chunk of rollouts; :meth:`collect_rewards` takes the handles of a round's chunks
        in rollout order. ``background`` (default: ``overlap_rewards``): in the module's one scoring thread
        (under ``no_grad``, on the videos' CUDA device), so the caller goes on generating; else now."""
        from concurrent.futures import Future, ThreadPoolExecutor

        from lightning_vidalign.rewards.base import find_rewards

        callbacks = find_rewards(self.trainer, names)

        def work() -> list[tuple]:
            if videos.is_cuda:
                torch.cuda.set_device(videos.device)
            out = []
            for cb in callbacks:
                r = cb.score(videos, batch).to(videos.device).float()
                out.append((cb, r, dict(cb.score_components())))
            return out

        if background if background is not None else self.overlap_rewards:
            if self._reward_pool is None:
                self._reward_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vidalign-reward")
            return self._reward_pool.submit(torch.no_grad()(work))
        done = Future()
        done.set_result(work())
        return done

    def collect_rewards(self, handles: list, log: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        """Wait for the chunks of :meth:`submit_rewards` and join them in order: ``(total, components)`` and the
        logs of :meth:`score_rewards` (a part's mean over all the chunks' values)."""
        chunks = [h.result() for h in handles]  # re-raises a reward's error here, in the training thread
        first = chunks[0][0][1]
        total = torch.zeros(sum(c[0][1].shape[0] for c in chunks), device=first.device)
        components = {}
        for i, (cb, _, _) in enumerate(chunks[0]):
            r = torch.cat([c[i][1] for c in chunks])
            components[cb.name] = r
            total += cb.weight * r
            if log:
                keys = [k for k in chunks[0][i][2] if k not in ("mean", "std")]
                parts = {f"reward/{cb.name}/{k}": torch.cat([c[i][2][k].detach().float().flatten().to(first.device) for c in chunks if k in c[i][2]]).mean() for k in keys}
                self.log_dict({f"reward/{cb.name}/mean": r.mean(), f"reward/{cb.name}/std": r.std(unbiased=False), **parts}, batch_size=r.shape[0])
        return total, components

    def teardown(self, stage: str) -> None:
        if self._reward_pool is not None:
            self._reward_pool.shutdown(wait=True)
            self._reward_pool = None
        super().teardown(stage)

    def randn_like(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """``N(0, I)`` with the shape of ``x``, drawn on CPU from ``generator`` (device-independent)."""
        return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)

    def sample_noise(self, x0: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Training ``(sigma (B,), noise like x0)`` from the backbone's noise distribution."""
        sigma = self.backbone.sample_sigma(x0.shape[0], generator).to(x0.device)
        return sigma, self.randn_like(x0, generator)

    @staticmethod
    def clip_size(batch: dict) -> tuple[int, int, int, int]:
        """``(B, T, H, W)`` of the batch's real clips: from ``batch["video"]``, or — training from the latent cache
        without pixels — from ``batch["first_frame"]`` and ``batch["num_frames"]``."""
        if "video" in batch:
            b, t, _, h, w = batch["video"].shape
            return b, t, h, w
        first = batch["first_frame"]
        return first.shape[0], int(torch.as_tensor(batch["num_frames"]).view(-1)[0]), first.shape[-2], first.shape[-1]

    @staticmethod
    def real_video(batch: dict, purpose: str) -> Tensor:
        """``batch["video"]``, the real pixel clips ``(B, T, 3, H, W)``.

        Raises:
            KeyError: when the batch comes from the latent cache without pixels, naming ``purpose`` and the option
                that adds them (``data.init_args.cache_video``).
        """
        if "video" not in batch:
            raise KeyError(f"{purpose} needs the real clips' pixels, and this batch comes from the latent cache without them: "
                           "set --data.init_args.cache_video true (latents still from the cache, pixels decoded from the videos)")
        return batch["video"]

    def rollout_videos(self, batch: dict, generator: torch.Generator, num: int | None = None) -> Tensor:
        """Sample one video per condition of ``batch`` (the first ``num``) with the module's sampler
        settings, at the size of ``batch["video"]``; returns ``(B, T, 3, H, W)`` in ``[0, 1]``."""
        video = batch["video"]
        sub = {k: v[:num] for k, v in batch.items()} if num else batch
        cond = self.backbone.encode_condition(sub, generator)
        traj = self.backbone.rollout(
            cond,
            self.sampler,
            self.num_inference_steps,
            self.guidance,
            generator,
            num_frames=video.shape[1],
            height=video.shape[-2],
            width=video.shape[-1],
        )
        return traj.video

    # ------------------------------------------------------------ the round's record
    def generate_rollouts(self, batch: dict, conditions: dict[str, Tensor], generator: torch.Generator, group_size: int,
                          sampler: str, decode: bool = True, keep_videos: bool = True, **rollout_kwargs) -> Rollouts:
        """``G = group_size`` rollouts of every condition of ``batch``, generated in chunks of ``rollout_batch_size``
        rollouts; with ``overlap_rewards`` each chunk is decoded at once and its reward job submitted (scored in the
        background while the next chunk is generated; collected by :meth:`score_rollouts`).

        Args:
            batch: the training batch of ``B`` conditions (its real clips give the size: :meth:`clip_size`).
            conditions: the batch's encoded conditions ``{key: (B, ...)}`` (repeated ``G`` times here).
            generator: the round's CPU generator (the rollouts' noise; kept in the record for the later phases).
            group_size: rollouts per condition ``G``.
            sampler: the backbone's sampler (flow models: an SDE type of
                :data:`~lightning_vidalign.sampling.SDE_TYPES`; SVD: ``euler`` | ``euler_ancestral``).
            decode: decode each chunk as it is generated (``backbone.rollout(decode=True)``); False: latents only, the
                videos decoded chunk by chunk when scored (:meth:`score_rollouts`), so no chunk's pixels are held while
                later chunks are generated (SHIFT, DPO). Decoding is deterministic: the same videos either way.
            keep_videos: keep the decoded videos in the record (False: DPO, which ranks by reward and trains on latents).
            **rollout_kwargs: passed to ``backbone.rollout`` (``keep_trajectory``, ``eta``, ``sde_steps``, ``keep_means``,
                ``log_prob_form``).

        Returns:
            :class:`~lightning_vidalign.rollouts.Rollouts` with ``conditions``, ``batch`` (each rollout's raw condition
            entries), ``latents``, ``videos`` (when decoded and kept), ``sigmas`` and, with ``keep_trajectory``, ``x_t``,
            ``x_next``, ``log_prob`` (and ``means`` with ``keep_means``); ``N = B·G`` rows in rollout order.
        """
        b, t, h, w = self.clip_size(batch)
        n, size = b * group_size, self.rollout_batch_size
        conditions = {k: v.repeat_interleave(group_size, 0) for k, v in conditions.items()}
        per_rollout = repeat_batch(batch, group_size, b)  # each rollout's condition (captions) for the rewards
        parts = []
        for i in range(0, n, size):
            chunk = {k: v[i : i + size] for k, v in conditions.items()}
            traj = self.backbone.rollout(chunk, sampler, self.num_inference_steps, self.guidance, generator, num_frames=t,
                                         height=h, width=w, decode=decode or self.overlap_rewards, **rollout_kwargs)
            part = Rollouts(latents=traj.latents, videos=traj.video if keep_videos else None, sigmas=traj.sigmas, x_t=traj.x_t,
                            x_next=traj.x_next, log_prob=traj.log_prob, means=traj.extras.get("mean"), generator=generator)
            if self.overlap_rewards:  # scored in the background while the next chunk is generated
                part.pending.append(self.submit_rewards(traj.video, self.reward_names, slice_batch(per_rollout, i, i + size, n)))
            elif decode:  # scored when collected (after the round's generation), on this very tensor: the values of
                # the overlapped path bit for bit (a reward's reduction over a copy in another memory layout may differ)
                part.pending.append(DeferredRewards(self.submit_rewards, traj.video, self.reward_names, slice_batch(per_rollout, i, i + size, n)))
            parts.append(part)
        rollouts = Rollouts.cat(parts)
        rollouts.conditions, rollouts.batch = conditions, per_rollout
        return rollouts

    def score_rollouts(self, rollouts: Rollouts, log: bool = True, keep_videos: bool = True) -> Rollouts:
        """Fill ``rewards`` (the weighted sum) and ``components`` (each reward callback's score) of ``rollouts``: the
        jobs :meth:`generate_rollouts` left in ``pending`` (submitted with ``overlap_rewards``; otherwise, for chunks it
        decoded, :class:`DeferredRewards` run now), else, for a record of latents only, every chunk of
        ``rollout_batch_size`` decoded and scored now (the videos kept in ``videos`` with ``keep_videos``). The same
        chunks, tensors and batch entries (:func:`~lightning_vidalign.rewards.base.slice_batch`) either way, so overlap
        changes when rewards are computed, never their values. ``log``: the per-reward logs of :meth:`collect_rewards`.
        Returns the same record."""
        if not rollouts.pending:
            n, size, decoded = len(rollouts), self.rollout_batch_size, []
            for i in range(0, n, size):
                if rollouts.videos is not None:
                    videos = rollouts.videos[i : i + size]
                else:
                    with self.timer("decode"):
                        videos = self.backbone.decode(rollouts.latents[i : i + size])
                    decoded.append(videos if keep_videos else None)
                rollouts.pending.append(self.submit_rewards(videos, self.reward_names, slice_batch(rollouts.batch, i, i + size, n)))
            if decoded and keep_videos:
                rollouts.videos = torch.cat(decoded)
        rollouts.rewards, rollouts.components = self.collect_rewards(rollouts.pending, log=log)
        rollouts.pending = []
        return rollouts

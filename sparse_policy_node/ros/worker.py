"""Policy node, worker threads: the frame encoder and one chunk at a time.

Resets and runtime changes are applied between chunks; a new model, device or graph backend
is prepared off the control path (ros/preparer.py) and swapped in between chunks. A chunk
leaves the worker only through :meth:`OutputsMixin._publish_plan` and ``~/action_chunk``
under the node's lock, after the safety layer's hold check (ros/outputs.py).
"""

import time

from rclpy.parameter import Parameter
from sparse_policy_node.core.engine import load_engine
from sparse_policy_node.core.engine import NonFiniteActionError
from sparse_policy_node.core.model_card import read_card
from sparse_policy_node.core.policy import ObservationError
from sparse_policy_node.core.rtc import prefix_from
from sparse_policy_node.core.seeded_noise import engine_chunk_noise
from sparse_policy_node.ros import conversions as conv
from sparse_policy_node.ros import params
from sparse_policy_node.ros.node_common import describe
from sparse_policy_node.ros.node_common import resolve_model_dir
import torch


class WorkerMixin:
    """Inference and frame-encoder threads of :class:`PolicyNode` (a mixin)."""

    def _encode_frames(self) -> None:
        while not self._stop.is_set():
            self._frames_ready.wait(0.05)
            self._frames_ready.clear()
            while self._frames and not self._stop.is_set():
                try:  # newest first: the next window needs the newest frames soonest
                    key, frame_id, image = self._frames.pop()
                except IndexError:
                    break
                if not self._frame_wanted(key, frame_id):
                    self.stats.count('frames_skipped_off_grid')
                    continue
                try:
                    self.engine.encode_frame(key, frame_id, torch.from_numpy(image))
                    self.stats.count('frames_encoded_ahead')
                except ObservationError as exc:
                    self._reject(key, exc)
                except Exception as exc:  # noqa: B902 - the chunk encodes the frame instead
                    self.stats.count('frame_encoder_errors')
                    self.get_logger().error(f'frame encoder failed: {exc!r}',
                                            throttle_duration_sec=5.0)

    def _frame_wanted(self, key, frame_id) -> bool:
        """Return False for a frame no future window picks (off the control grid).

        The next window is due at the last (or running) chunk's stamp plus the executed
        horizon; frames before its first step, less the sync tolerance, are never picked.
        A chunk still encodes any frame it needs that was skipped here.
        """
        episode, ns = frame_id
        if episode != self._episode:
            return False
        dt, due = self.dt_ns, None
        last, running = self._last, self._running
        if last is not None:
            due = last[0] + (last[1] - self._lead_steps()) * dt - dt // 2
        if running is not None and running[0] == episode:
            due = running[1] if due is None else max(due, running[1])
        return self.history.may_pick(key, ns, due)

    def _rtc_delay(self) -> int:
        """Return the rtc delay d in control steps, from the measured latency."""
        s = self.settings
        horizon = s.execution_horizon or self.n_action_steps
        cap = min(s.execution_delay_cap_steps or horizon - 1, horizon - 1)
        return self._delay.steps(self.dt_ns / 1e9, s.execution_delay_percentile,
                                 min(s.execution_delay_floor_steps, cap), cap,
                                 s.execution_exec_latency_s)

    def _lead_steps(self) -> int:
        """Start the next chunk this many steps before the current one ends.

        rtc: at least d, so that the d steps pinned in the next chunk are still the current
        chunk's (the chunk then arrives before the current one runs out).
        """
        s = self.settings
        if s.execution_mode != 'rtc':
            return s.replan_lead_steps
        return max(s.replan_lead_steps, self._rtc_delay())

    def _rtc_prefix(self, stamp_ns: int):
        """Return the executing chunk's actions from ``stamp_ns`` on (the next chunk's prefix).

        The same calls as ``sparse-policy latency``: :meth:`ChunkExecutor.committed` and
        :func:`core.rtc.prefix_from`. Integrated deltas keep the model's actions in the
        first ``action_dim`` columns of the executor's values (targets after them).
        """
        with self._lock:
            if self._current is None:
                return None  # first chunk, or after a hold / reset: nothing runs
            committed = self._exec.committed(stamp_ns)
        if committed is None:
            return None
        horizon = self.settings.execution_horizon or self.n_action_steps
        d = self._rtc_delay()
        self.stats.count(f'rtc_delay_steps_{d}')  # the d each rtc chunk pinned
        return prefix_from(committed[:, :self.action_dim], d, horizon)

    def _work(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.05)
            self._wake.clear()
            try:
                self._params_watch.poll()  # Humble: no post-set callback
                self._apply_changes()
                self._maybe_run_chunk()
            except Exception as exc:  # noqa: B902 - keep serving; the error is diagnosed
                self.stats.count('worker_errors')
                self._error = f'inference failed: {describe(exc)}'
                self.get_logger().error(self._error, throttle_duration_sec=5.0)

    def _apply_changes(self) -> None:
        self._swap_prepared()
        with self._lock:
            dirty, self._dirty = self._dirty, False
        if not dirty:
            return
        s, old = params.settings_from_params(self), self.settings
        runtime = params.config_from_params(self)
        rebuild = params.what_to_rebuild(old, s)  # the safety layer: _apply_safety, at once
        if 'engine' in rebuild or self._preparer.busy() or self.engine.needs_build(runtime):
            # Seconds of loading or exporting: built beside the running engine, swapped in
            # between two chunks; the runtime knobs changed meanwhile come with it.
            self._prepare(s.model_dir, s.device, runtime)
            s.model_dir, s.device = old.model_dir, old.device  # served until the swap
        else:
            self.engine.set_runtime(runtime)
        if 'threads' in rebuild:
            torch.set_num_threads(s.num_threads)
        if 'timing' in rebuild:
            self.history.set_timing(*self._timing_ns(s))
        self.settings = s

    def _prepare(self, model_dir: str, device: str, runtime) -> None:
        """Build the engine for (model_dir, device, runtime) off the control path."""
        if self._preparer.busy():
            return  # what it builds is compared with what is wanted when it is done

        def build():
            path = resolve_model_dir(model_dir)
            engine = load_engine(path, device, runtime)
            engine.backend_for(runtime)  # export and load the graphs here, not in a chunk
            return engine, read_card(path, engine.policy.config)

        self._preparer.start((model_dir, device, runtime), build)
        self.get_logger().info(f'preparing {model_dir} on {device} (backend {runtime.backend}) '
                               f'off the control path; {self.settings.model_dir} serves '
                               f'meanwhile')

    def _swap_prepared(self) -> None:
        """Swap a prepared engine in with its card (between chunks), or report its failure.

        A build that no longer matches the parameters (they changed while it ran) is dropped
        and the newest wish prepared instead. The swapped-in engine starts dense.
        """
        done = self._preparer.take()
        if done is None:
            return
        if done.error is not None:
            self._keep_running_model(done)
            return
        engine, card = done.value
        s = params.settings_from_params(self)
        if (s.model_dir, s.device, params.config_from_params(self)) != done.target:
            engine.close()
            with self._lock:
                self._dirty = True
            return
        with self._lock:
            old, self.engine, self.card = self.engine, engine, card
            self.settings.model_dir, self.settings.device = s.model_dir, s.device
        engine.reset()
        old.close()
        self._delay.reset()  # another engine: another latency (rtc's delay estimate)
        self.stats.count('engine_swaps')
        self.get_logger().info(
            f'now serving {s.model_dir} on {s.device} (backend '
            f'{engine.backend_for(engine.runtime).name}), prepared in {done.seconds:.1f} s '
            f'while the previous engine served; its first chunk is dense')

    def _keep_running_model(self, done) -> None:
        """Keep the running engine and revert the parameters after a failed preparation.

        The reverted parameters show what is actually served, later unrelated changes do not
        retry the build, and the error stands in the diagnostics until the next good chunk.
        """
        model_dir, device, runtime = done.target
        s, served = self.settings, self.engine.runtime
        self.stats.count('model_load_failures')
        self._error = (f'model change to {model_dir} on {device} (backend {runtime.backend}) '
                       f'failed, kept {s.model_dir} on {s.device} (backend {served.backend}): '
                       f'{describe(done.error)}')
        self.get_logger().error(self._error)
        revert = [Parameter(name, value=value) for name, value, wanted in (
            ('model_dir', s.model_dir, model_dir), ('device', s.device, device),
            ('inference.backend', served.backend, runtime.backend),
            ('inference.precision', served.precision, runtime.precision)) if value != wanted]
        result = self.set_parameters(revert)
        if not all(r.successful for r in result):
            self.get_logger().error(f'could not revert {[p.name for p in revert]}: {result}')

    def _watch_inputs(self, window_reason: str) -> list:
        """Apply the staleness rule to every input; log each gap once; count sync failures.

        Returns:
            the stale or missing observation keys.
        """
        s = self.settings
        ages = self.history.ages(self.get_clock().now().nanoseconds)
        stale = [k for k, a in ages.items() if a > s.max_obs_age_s]
        if stale and not self._gap and not self._inputs_seen:
            self._gap = True  # start-up: the inputs' publishers may not run yet
            self.get_logger().info(f'waiting for the first inputs: {", ".join(stale)}; '
                                   f'chunks start when every input has arrived')
        elif stale and not self._gap:
            self._gap = True
            self.stats.count('input_gaps')
            self.get_logger().warning(
                'no chunks: stale or missing inputs ' + ', '.join(
                    f'{k} ({ages[k]:.2f} s)' for k in stale) + f' (max_obs_age_s='
                f'{s.max_obs_age_s}); chunks resume when they are fresh again')
        elif not stale and self._gap:
            self._gap = False
            self.get_logger().info('all inputs fresh again: chunks resume' if self._inputs_seen
                                   else 'all inputs arrived: chunks start')
        if not stale and not self.history.missing():
            self._inputs_seen = True
        if window_reason and not window_reason.startswith('waiting for') \
                and self._inputs_version != self._sync_failed_version:
            self._sync_failed_version = self._inputs_version  # once per new input
            self.stats.count('sync_failures')
            self.get_logger().warning(f'no synchronized window: {window_reason}',
                                      throttle_duration_sec=5.0)
        return stale

    def _pause_before(self, stamp_ns: int) -> bool:
        """Return True after a hold, or an input gap longer than resume_dense_after_s."""
        if self._last_chunk_ns is None:
            return False
        s = self.settings
        limit = s.safety_resume_dense_after_s or \
            2 * (s.execution_horizon or self.n_action_steps) * self.dt_ns / 1e9
        with self._lock:
            paused = self._paused
        if paused or stamp_ns - self._last_chunk_ns > limit * 1e9:
            self.get_logger().info('first chunk after a pause: rollout cache dropped, dense')
            with self._lock:
                self._paused = False
                self._last_chunk_ns = None
            return True
        return False

    def _wait_emulated_latency(self, stamp_ns: int) -> None:
        """execution.emulated_latency_s: hold the chunk until the clock is that far past.

        A test of execution under a known latency (the clock is sim time in the bring-up).
        Bounded in wall time: a clock that stops (a lockstep bridge waits for this chunk)
        does not stall the node.
        """
        extra = self.settings.execution_emulated_latency_s
        if extra <= 0:
            return
        target = stamp_ns + int(round(extra * 1e9))
        give_up = time.monotonic() + 1.0 + 20.0 * extra
        while self.get_clock().now().nanoseconds < target and not self._stop.is_set():
            if time.monotonic() > give_up:
                self.get_logger().warning('execution.emulated_latency_s: the clock did not '
                                          'reach the emulated latency; publishing',
                                          throttle_duration_sec=5.0)
                return
            self._stop.wait(0.001)

    def _maybe_run_chunk(self) -> None:
        if not self._active or self.safety.deadman.reason(
                self.get_clock().now().nanoseconds, self.safety.config.enable_timeout_s):
            return
        s, dt = self.settings, self.dt_ns
        # Read the episode before the window: a reset in between makes the chunk one of the
        # old episode (discarded below), never a new-episode chunk of old observations.
        episode = self._episode
        window, why = self.history.window()
        stale = self._watch_inputs(why)
        if window is None or window.stamp_ns == self._skip_stamp:
            return
        lead = self._lead_steps()
        if self._last is not None and window.stamp_ns < self._last[0] + (
                self._last[1] - lead) * dt - dt // 2:
            return  # the previous chunk is still being executed
        if stale:
            self._skip_stamp = window.stamp_ns
            self.stats.count('stale_skips')
            return
        device = self.engine.device
        # While this chunk runs, the frame encoder skips frames before the next window.
        self._running = (episode, window.stamp_ns + ((s.execution_horizon or self.n_action_steps)
                                                     - lead) * dt - dt // 2)
        obs = {k: torch.from_numpy(v).unsqueeze(0).to(device) for k, v in window.arrays.items()}
        frame_ids = {k: [(episode, ns) for ns in window.stamps[k]] for k in self.image_keys}
        # noise_seed >= 0: noise from (seed, window stamp), reproducible offline (replay-bag).
        noise = engine_chunk_noise(self.engine, s.noise_seed, window.stamp_ns)
        holds = self._blocking_holds     # before the pause check: see the publish check
        if episode != self._engine_episode:
            # The episode's first chunk: dense, from empty caches. Tied to the chunk's own
            # episode, not to when the worker last looked for changes: a reset that lands
            # after that look still clears, and a chunk of the old episode never clears.
            self.engine.reset()
            self._engine_episode = episode
        elif self._pause_before(window.stamp_ns):
            self.engine.reset()  # after a hold or an input gap: the first chunk is dense
            self.stats.count('dense_after_pause')
        prefix = self._rtc_prefix(window.stamp_ns) if s.execution_mode == 'rtc' else None
        try:
            out = self.engine.predict_action(obs, frame_ids=frame_ids, prefix=prefix, **noise)
        except ObservationError as exc:
            self._skip_stamp = window.stamp_ns
            self._reject('observation', exc)
            return
        except NonFiniteActionError as exc:
            self._skip_stamp = window.stamp_ns
            self._reject('action', exc)
            return
        horizon = s.execution_horizon or self.n_action_steps
        try:
            actions = conv.finite_actions(out['action'][0, :horizon].double().cpu().numpy())
        except conv.ConversionError as exc:
            self._skip_stamp = window.stamp_ns
            self._reject('action', exc)
            return
        try:
            actions, plan = self._plan(window.stamp_ns, actions)
        except conv.ConversionError as exc:
            self._skip_stamp = window.stamp_ns
            self._reject('action', exc)
            return
        self._wait_emulated_latency(window.stamp_ns)
        # Checked and published under the lock that resets and deactivation take: a chunk
        # of an old episode, or one finished after deactivation, never goes out; nor one
        # that the enable input or the watchdog holds now (checked at publish time).
        with self._lock:
            now = self.get_clock().now().nanoseconds
            if episode != self._episode:
                self.stats.count('discarded_after_reset')  # computed for the old episode
                return
            if not self._active:
                self.stats.count('discarded_inactive')     # deactivated while computing
                return
            hold = self._hold_now(now, covered=True)
            if hold:
                self.stats.count('discarded_holding')      # disabled or stalled meanwhile
                self._hold(hold, now)
                return
            if self._blocking_holds != holds:
                # A hold no chunk ends (enable, stale inputs) began and ended while this
                # chunk ran: it comes from before the pause, so it is dropped and the next
                # chunk starts dense.
                self.stats.count('discarded_holding')
                self._paused = True
                return
            if not self._publish_plan(window.stamp_ns, actions, plan):
                return
            self._release_hold()
            self._exec.commit(self._planned)
            self._last, self._current = (window.stamp_ns, len(actions)), (window.stamp_ns,
                                                                          actions, plan)
            self._last_chunk_ns, self._paused = window.stamp_ns, False
            stamp_to_chunk_s = (now - window.stamp_ns) / 1e9  # observation to publication
            self._delay.add(stamp_to_chunk_s)
            self.chunk_pub.publish(conv.chunk_to_trajectory(
                actions, self.names, dt, conv.ns_to_stamp(window.stamp_ns)))
            self._publish_due_step()
        self._error = None
        st = out['stats']
        self.stats.chunk(st['latency_ms'], (time.monotonic() - window.newest_arrival) * 1e3,
                         st['realized_sparsity'], st['dense'], stamp_to_chunk_s * 1e3)
        self.stats.count('frames_encoded_in_chunks', st['frames_encoded'])
        self.get_logger().debug(f'chunk at {window.stamp_ns / 1e9:.3f} s: '
                                f'{st["latency_ms"]:.1f} ms, sparsity '
                                f'{st["realized_sparsity"]:.2f}')

package scheduler

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
	"tvixfarm/cas/grpcservers"

	schedulerpb "tvixfarm/proto/tvixfarm/scheduler/v1"
	workerpb "tvixfarm/proto/tvixfarm/worker/v1"
	"tvixfarm/scheduler/state"
)

// WorkersConfig configures the worker sessions.
type WorkersConfig struct {
	// HeartbeatInterval is how often workers send heartbeats (default
	// 1 s). A worker silent for WorkerTimeout (default 5 intervals) is
	// removed and its actions are requeued.
	HeartbeatInterval time.Duration
	WorkerTimeout     time.Duration
	// RetainCompleted is how long completed operations stay queryable
	// (default 1 h).
	RetainCompleted time.Duration
	// PlatformGrace: queued operations that no registered worker could
	// run fail after it (default 30 s after this node became leader).
	PlatformGrace time.Duration
	Logger        *slog.Logger
}

// Workers serves the worker protocol on the leader: it applies
// registrations, results and removals, and delivers the assignments and
// cancellations the state machine makes to the workers' streams. It also
// runs the leader's housekeeping: lost workers, unsatisfiable
// operations, compaction.
type Workers struct {
	workerpb.UnimplementedWorkersServer

	n      *Node
	cfg    WorkersConfig
	log    *slog.Logger
	stores *blobstore.Instances

	mu          sync.Mutex
	sessions    map[string]*session
	gone        map[string]time.Time // workers without a session, since
	leaderSince time.Time            // zero when not leader
}

// failoverGrace is the extra time a new leader gives the workers it
// knows from the log to reconnect, on top of WorkerTimeout.
const failoverGrace = 5 * time.Second

// session is one worker's stream on this node.
type session struct {
	worker   string
	send     chan *workerpb.SchedulerMessage
	lastSeen time.Time // guarded by Workers.mu
	// registered: its RegisterWorker has been applied (guarded by
	// Workers.mu); until then it is not timed out.
	registered bool
	done       chan struct{}
	once       sync.Once
}

func (s *session) close() { s.once.Do(func() { close(s.done) }) }

// NewWorkers returns the worker service of node n and starts its
// housekeeping loop, which stops with ctx.
func NewWorkers(ctx context.Context, n *Node, stores *blobstore.Instances, cfg WorkersConfig) *Workers {
	if cfg.HeartbeatInterval <= 0 {
		cfg.HeartbeatInterval = time.Second
	}
	if cfg.WorkerTimeout <= 0 {
		cfg.WorkerTimeout = 5 * cfg.HeartbeatInterval
	}
	if cfg.RetainCompleted <= 0 {
		cfg.RetainCompleted = time.Hour
	}
	if cfg.PlatformGrace <= 0 {
		cfg.PlatformGrace = 30 * time.Second
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	w := &Workers{n: n, cfg: cfg, log: log, stores: stores, sessions: make(map[string]*session), gone: make(map[string]time.Time)}
	n.OnApply(w.deliver)
	go w.housekeeping(ctx)
	return w
}

// settled reports whether this node has led for longer than grace, so
// that workers have had time to connect to it.
func (w *Workers) settled(grace time.Duration) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return !w.leaderSince.IsZero() && time.Since(w.leaderSince) > grace
}

// Connect serves one worker's session.
func (w *Workers) Connect(stream grpc.BidiStreamingServer[workerpb.WorkerMessage, workerpb.SchedulerMessage]) error {
	ctx := stream.Context()
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	reg := first.GetRegister()
	if reg == nil || reg.WorkerId == "" || reg.Slots <= 0 {
		return status.Error(codes.InvalidArgument, "the first message must be a Register with a worker id and slots")
	}
	if !w.n.IsLeader() {
		return status.Error(codes.Unavailable, "scheduler: not the leader")
	}
	s := &session{worker: reg.WorkerId, send: make(chan *workerpb.SchedulerMessage, 4096), lastSeen: time.Now(), done: make(chan struct{})}
	w.mu.Lock()
	if old := w.sessions[reg.WorkerId]; old != nil {
		old.close()
	}
	w.sessions[reg.WorkerId] = s
	delete(w.gone, reg.WorkerId)
	w.mu.Unlock()
	defer func() {
		w.mu.Lock()
		if w.sessions[s.worker] == s {
			delete(w.sessions, s.worker)
			w.gone[s.worker] = time.Now()
		}
		w.mu.Unlock()
		s.close()
	}()

	platform := make([]*schedulerpb.Property, len(reg.Platform))
	for i, p := range reg.Platform {
		platform[i] = &schedulerpb.Property{Name: p.Name, Value: p.Value}
	}
	// Registered goes first: the registration's own assignments follow it.
	s.send <- &workerpb.SchedulerMessage{Msg: &workerpb.SchedulerMessage_Registered{Registered: &workerpb.Registered{
		HeartbeatIntervalMs: w.cfg.HeartbeatInterval.Milliseconds(), Node: w.n.ID()}}}
	res, err := w.n.Apply(ctx, &schedulerpb.Command{Command: &schedulerpb.Command_RegisterWorker{RegisterWorker: &schedulerpb.RegisterWorker{
		Worker: reg.WorkerId, Platform: platform, Slots: reg.Slots, Running: reg.Running, TimeUnixNano: time.Now().UnixNano()}}})
	if err == nil && res[0].Err != nil {
		err = res[0].Err
	}
	if err != nil {
		return err
	}
	// Heartbeats count from here: the registration may take longer than
	// WorkerTimeout to commit on a leader that has just been elected, and
	// the worker's heartbeats are not read before it has.
	w.mu.Lock()
	s.lastSeen, s.registered = time.Now(), true
	w.mu.Unlock()
	w.log.Info("scheduler: worker connected", "worker", reg.WorkerId, "slots", reg.Slots)

	errc := make(chan error, 1)
	go func() {
		for {
			select {
			case m := <-s.send:
				if err := stream.Send(m); err != nil {
					errc <- err
					return
				}
			case <-s.done:
				errc <- status.Error(codes.Unavailable, "scheduler: session replaced or lost")
				return
			case <-ctx.Done():
				errc <- ctx.Err()
				return
			}
		}
	}()
	recvc := make(chan error, 1)
	results := make(chan *workerpb.Result, 4096)
	go func() {
		for {
			m, err := stream.Recv()
			if err != nil {
				recvc <- err
				return
			}
			w.mu.Lock()
			s.lastSeen = time.Now()
			w.mu.Unlock()
			var rs []*workerpb.Result
			switch m := m.Msg.(type) {
			case *workerpb.WorkerMessage_Heartbeat:
			case *workerpb.WorkerMessage_Result:
				rs = []*workerpb.Result{m.Result}
			case *workerpb.WorkerMessage_Results:
				rs = m.Results.Results
			default:
				recvc <- status.Error(codes.InvalidArgument, "unexpected message from a worker")
				return
			}
			for _, r := range rs {
				select {
				case results <- r:
				case <-s.done:
					recvc <- status.Error(codes.Unavailable, "scheduler: session closed")
					return
				}
			}
		}
	}()
	go w.record(ctx, s, results)
	select {
	case err = <-errc:
	case err = <-recvc:
	}
	s.close()
	if errors.Is(err, context.Canceled) {
		return status.FromContextError(err).Err()
	}
	return err
}

// maxResultBatch bounds the results recorded in one Apply.
const maxResultBatch = 1024

// record applies the results of session s as they arrive: those that
// arrive together are written to the action cache in parallel, then
// completed in one Apply and acknowledged in one message, with a few
// batches in flight so that the batches grow with the load. It returns
// when the session ends.
func (w *Workers) record(ctx context.Context, s *session, results <-chan *workerpb.Result) {
	sem := make(chan struct{}, maxInflight)
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		var first *workerpb.Result
		select {
		case first = <-results:
		case <-s.done:
			return
		}
		select {
		case sem <- struct{}{}:
		case <-s.done:
			return
		}
		batch := []*workerpb.Result{first}
	collect:
		for len(batch) < maxResultBatch {
			select {
			case r := <-results:
				batch = append(batch, r)
			default:
				break collect
			}
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			w.complete(ctx, s, batch)
		}()
	}
}

// complete records a batch of results of session s and acknowledges
// them. Unacknowledged results (the Apply failed) are sent again by the
// worker on its next session, so the session is closed.
func (w *Workers) complete(ctx context.Context, s *session, batch []*workerpb.Result) {
	// The action cache first, so that a client that sees an operation
	// completed finds its result cached.
	type entry struct {
		r    *workerpb.Result
		info state.Action
	}
	var cacheable []entry
	w.n.Read(func(st *state.State) {
		for _, r := range batch {
			if info, ok := st.Leased(r.Operation, r.Lease); ok && !info.DoNotCache {
				cacheable = append(cacheable, entry{r, info})
			}
		}
	})
	blobstore.ParallelFor(len(cacheable), func(i int) { w.cache(ctx, cacheable[i].info, cacheable[i].r.ExecuteResponse) })
	now := time.Now().UnixNano()
	cmds := make([]*schedulerpb.Command, len(batch))
	for i, r := range batch {
		cmds[i] = &schedulerpb.Command{Command: &schedulerpb.Command_Complete{Complete: &schedulerpb.Complete{
			Operation: r.Operation, Worker: s.worker, Lease: r.Lease, Result: r.ExecuteResponse, TimeUnixNano: now}}}
	}
	if _, err := w.n.Apply(ctx, cmds...); err != nil {
		w.log.Debug("scheduler: recording results failed", "results", len(batch), "err", err)
		s.close()
		return
	}
	acks := make([]*workerpb.ResultAck, len(batch))
	for i, r := range batch {
		acks[i] = &workerpb.ResultAck{Operation: r.Operation, Lease: r.Lease}
	}
	select {
	case s.send <- &workerpb.SchedulerMessage{Msg: &workerpb.SchedulerMessage_Acks{Acks: &workerpb.ResultAcks{Acks: acks}}}:
	case <-s.done:
	}
}

// deliver sends a batch's assignments and cancellations to the workers'
// sessions on this node. It runs on the FSM goroutine and never blocks: a
// session that cannot keep up is closed, and its worker, reconnecting,
// reconciles what it runs with the state.
func (w *Workers) deliver(resp *state.Response) {
	if len(resp.Assignments) == 0 && len(resp.Cancellations) == 0 || !w.n.IsLeader() {
		// A node that lost leadership may still hold sessions until
		// housekeeping closes them: the new leader delivers.
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	send := func(worker string, m *workerpb.SchedulerMessage) {
		s := w.sessions[worker]
		if s == nil {
			return
		}
		select {
		case s.send <- m:
		default:
			w.log.Warn("scheduler: worker session overflowed; closing it", "worker", worker)
			s.close()
		}
	}
	// One message per worker with its assignments, in order.
	var order []string
	assigns := make(map[string][]*workerpb.Assign)
	for _, a := range resp.Assignments {
		if assigns[a.Worker] == nil {
			order = append(order, a.Worker)
		}
		assigns[a.Worker] = append(assigns[a.Worker], &workerpb.Assign{
			Operation: a.Operation, Lease: a.Lease, InstanceName: a.Instance, DigestFunction: a.DigestFunction,
			ActionHash: a.ActionDigest.GetHash(), ActionSize: a.ActionDigest.GetSizeBytes(), QueuedUnixNano: a.QueuedUnixNano})
	}
	for _, wk := range order {
		send(wk, &workerpb.SchedulerMessage{Msg: &workerpb.SchedulerMessage_Assignments{Assignments: &workerpb.Assignments{Assigns: assigns[wk]}}})
	}
	for _, c := range resp.Cancellations {
		send(c.Worker, &workerpb.SchedulerMessage{Msg: &workerpb.SchedulerMessage_Cancel{Cancel: &workerpb.Cancel{Operation: c.Operation, Lease: c.Lease}}})
	}
}

// housekeeping runs on every node and acts while it leads: it removes
// workers whose heartbeats stopped, fails queued operations no worker
// could run once the grace period is over, and compacts old operations.
func (w *Workers) housekeeping(ctx context.Context) {
	t := time.NewTicker(w.cfg.HeartbeatInterval / 2)
	defer t.Stop()
	lastCompact := time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		leader := w.n.IsLeader()
		w.mu.Lock()
		switch {
		case leader && w.leaderSince.IsZero():
			// New leader: every known worker gets time to notice and
			// connect to it (reconnecting takes longer than a
			// heartbeat), before its leases are given up.
			w.leaderSince = time.Now()
			w.gone = make(map[string]time.Time)
		case !leader && !w.leaderSince.IsZero():
			w.leaderSince = time.Time{}
			for _, s := range w.sessions {
				s.close() // workers reconnect, via a follower's forwarding, to the new leader
			}
		}
		since := w.leaderSince
		w.mu.Unlock()
		if !leader {
			continue
		}
		var cmds []*schedulerpb.Command
		now := time.Now()
		var workers []*schedulerpb.Worker
		var queued []*schedulerpb.Operation
		w.n.Read(func(s *state.State) {
			workers = s.Workers()
			if now.Sub(since) > w.cfg.PlatformGrace {
				queued = s.Operations(schedulerpb.Stage_STAGE_QUEUED)
				kept := queued[:0]
				for _, op := range queued {
					if k, v, ok := s.Unsatisfiable(op.Platform); ok && now.Sub(time.Unix(0, op.QueuedUnixNano)) > w.cfg.PlatformGrace {
						op.Status = &schedulerpb.Status{Code: int32(codes.FailedPrecondition), Message: "no worker can run it: " + describeUnsat(k, v)}
						kept = append(kept, op)
					}
				}
				queued = kept
			}
		})
		w.mu.Lock()
		for _, wk := range workers {
			reason := ""
			if s := w.sessions[wk.Id]; s != nil {
				if s.registered && now.Sub(s.lastSeen) > w.cfg.WorkerTimeout {
					reason = "missed heartbeats"
					s.close()
				}
			} else {
				from, ok := w.gone[wk.Id]
				if !ok {
					// Known from the log, never connected to this leader.
					from = since.Add(failoverGrace)
					w.gone[wk.Id] = from
				}
				if now.Sub(from) > w.cfg.WorkerTimeout {
					reason = "disconnected"
				}
			}
			if reason != "" {
				cmds = append(cmds, &schedulerpb.Command{Command: &schedulerpb.Command_RemoveWorker{RemoveWorker: &schedulerpb.RemoveWorker{
					Worker: wk.Id, Reason: reason, TimeUnixNano: now.UnixNano()}}})
				delete(w.gone, wk.Id)
				w.log.Warn("scheduler: worker lost; requeueing its actions", "worker", wk.Id, "reason", reason)
			}
		}
		w.mu.Unlock()
		for _, op := range queued {
			cmds = append(cmds, &schedulerpb.Command{Command: &schedulerpb.Command_Fail{Fail: &schedulerpb.Fail{
				Operation: op.Name, Status: op.Status, TimeUnixNano: now.UnixNano()}}})
		}
		if now.Sub(lastCompact) > time.Minute {
			lastCompact = now
			cmds = append(cmds, &schedulerpb.Command{Command: &schedulerpb.Command_Compact{Compact: &schedulerpb.Compact{
				BeforeUnixNano: now.Add(-w.cfg.RetainCompleted).UnixNano()}}})
		}
		if len(cmds) > 0 {
			actx, cancel := context.WithTimeout(ctx, 10*time.Second)
			if _, err := w.n.Apply(actx, cmds...); err != nil {
				w.log.Warn("scheduler: housekeeping", "err", err)
			}
			cancel()
		}
	}
}

// Drain stops (or resumes) assignments to a worker.
func (w *Workers) Drain(ctx context.Context, worker string, drained bool) error {
	res, err := w.n.Apply(ctx, &schedulerpb.Command{Command: &schedulerpb.Command_Drain{Drain: &schedulerpb.Drain{
		Worker: worker, Drained: drained, TimeUnixNano: time.Now().UnixNano()}}})
	if err != nil {
		return err
	}
	return res[0].Err
}

// cache stores the ExecuteResponse data of action info in the action
// cache if it is a success.
func (w *Workers) cache(ctx context.Context, info state.Action, data []byte) {
	var resp repb.ExecuteResponse
	if err := proto.Unmarshal(data, &resp); err != nil || resp.Result == nil || resp.Result.ExitCode != 0 ||
		resp.Status.GetCode() != int32(codes.OK) {
		return
	}
	fn, err := digest.FunctionFromProto(repb.DigestFunction_Value(info.DigestFunction))
	if err != nil {
		return
	}
	ad, err := digest.Parse(fn, info.Digest.GetHash(), info.Digest.GetSizeBytes())
	if err != nil {
		return
	}
	st := w.stores.For(info.Instance)
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := grpcservers.PutActionResult(ctx, st, ad, resp.Result); err != nil {
		w.log.Warn("scheduler: cannot store an action result", "action", ad.Sprint(), "err", err)
	}
}

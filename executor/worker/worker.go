// Package worker connects an executor to the scheduler: it dials the
// scheduler (so workers work behind NAT), registers the executor's
// platform and slots, runs the actions it is assigned, and sends
// heartbeats and results, reconnecting by itself when the stream breaks
// or the scheduler's leader changes.
package worker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"tvixfarm/cas/digest"
	"tvixfarm/executor"
	workerpb "tvixfarm/proto/tvixfarm/worker/v1"
)

// Runner runs actions: an *executor.Executor, or NoOp for measuring the
// scheduler alone.
type Runner interface {
	Execute(ctx context.Context, req *executor.Request) (*repb.ExecuteResponse, error)
	Platform() *repb.Platform
	Slots() int
}

// Config configures a Worker.
type Config struct {
	// ID names the worker in the cluster; it must be stable across
	// restarts and reconnects.
	ID     string
	Logger *slog.Logger
}

// Worker is an executor's session with the scheduler.
type Worker struct {
	cfg    Config
	conn   grpc.ClientConnInterface
	runner Runner
	log    *slog.Logger

	mu      sync.Mutex
	running map[string]*job    // by operation
	pending map[string]*result // results not acknowledged, by operation
	// seen holds the leases received lately (a ring of recent ones): an
	// assignment delivered twice, for example by a node that has just
	// lost leadership and by its successor, runs once.
	seen     map[uint64]struct{}
	seenRing []uint64
	seenNext int
	// gen counts sessions: assignments that arrive on an ended session
	// (after the next one listed what runs) are ignored; the scheduler
	// has requeued them.
	gen uint64
	// send carries the session's results to its sender.
	send chan *workerpb.Result
}

type job struct {
	lease  uint64
	cancel context.CancelFunc
}

type result struct {
	lease uint64
	data  []byte
}

// DialOptions are the options for the connection a worker reaches the
// scheduler through, besides credentials. grpc-go waits 1 s, then 1.6 s
// and longer, before it dials again once every address of a channel has
// failed: after a leader's death that left workers idle for seconds
// after a new leader was elected. A worker dials again within 100 ms to
// 1 s instead; a scheduler node is cheap to dial.
func DialOptions() []grpc.DialOption {
	return []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
		Backoff:           backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second},
		MinConnectTimeout: 5 * time.Second,
	})}
}

// New returns a worker that reaches the scheduler through conn.
func New(conn grpc.ClientConnInterface, runner Runner, cfg Config) *Worker {
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	return &Worker{cfg: cfg, conn: conn, runner: runner, log: log.With("worker", cfg.ID),
		running: make(map[string]*job), pending: make(map[string]*result),
		seen: make(map[uint64]struct{}), seenRing: make([]uint64, 1<<16)}
}

// Run keeps a session with the scheduler until ctx ends, reconnecting
// with backoff. Actions running when ctx ends are cancelled.
func (w *Worker) Run(ctx context.Context) error {
	backoff := 50 * time.Millisecond
	for {
		start := time.Now()
		registered, err := w.session(ctx)
		if ctx.Err() != nil {
			w.cancelAll()
			return ctx.Err()
		}
		// A session the scheduler accepted ended: that is news (a leader
		// change, say), not a scheduler that keeps refusing us.
		if registered || time.Since(start) > 5*time.Second {
			backoff = 50 * time.Millisecond
		}
		w.log.Info("worker: session ended; reconnecting", "err", err, "in", backoff)
		select {
		case <-ctx.Done():
			w.cancelAll()
			return ctx.Err()
		case <-time.After(backoff + rand.N(backoff/2+1)):
		}
		backoff = nextBackoff(backoff, err)
	}
}

// nextBackoff is the wait before the session after one that failed with
// err, after a wait of d. UNAVAILABLE (or a session the node ended) is
// what a cluster says while it elects a leader, and what the channel
// says while it moves off a dead node: the farm is back within a second
// or two, and every dispatch waits for the workers to register again, so
// those retries stay frequent. Other refusals back off further.
func nextBackoff(d time.Duration, err error) time.Duration {
	limit := 2 * time.Second
	if status.Code(err) == codes.Unavailable || errors.Is(err, io.EOF) {
		limit = unavailableBackoff
	}
	return min(2*d, limit)
}

// unavailableBackoff caps the wait between sessions that failed with
// UNAVAILABLE.
const unavailableBackoff = 200 * time.Millisecond

func (w *Worker) cancelAll() {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, j := range w.running {
		j.cancel()
	}
}

// registerTimeout bounds connecting and registering.
const registerTimeout = 10 * time.Second

// session is one Connect stream; registered reports whether the
// scheduler accepted the registration.
func (w *Worker) session(ctx context.Context) (registered bool, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Wait for a connection rather than fail at once: with several
	// scheduler addresses the first may be a dead node, and the channel
	// moves on to the next one by itself. The registration has a
	// deadline; the session that follows has none.
	deadline := time.AfterFunc(registerTimeout, cancel)
	defer deadline.Stop()
	stream, err := workerpb.NewWorkersClient(w.conn).Connect(ctx, grpc.WaitForReady(true))
	if err != nil {
		return false, err
	}
	w.mu.Lock()
	var running []string
	for op := range w.running {
		running = append(running, op)
	}
	for op := range w.pending {
		running = append(running, op)
	}
	send := make(chan *workerpb.Result, 4096)
	w.send = send
	w.gen++
	gen := w.gen
	// Results not acknowledged by the last session go first.
	for op, r := range w.pending {
		send <- resultMsg(op, r)
	}
	w.mu.Unlock()
	platform := w.runner.Platform()
	reg := &workerpb.Register{WorkerId: w.cfg.ID, Slots: int32(w.runner.Slots()), Running: running}
	for _, p := range platform.GetProperties() {
		reg.Platform = append(reg.Platform, &workerpb.Property{Name: p.Name, Value: p.Value})
	}
	if err := stream.Send(&workerpb.WorkerMessage{Msg: &workerpb.WorkerMessage_Register{Register: reg}}); err != nil {
		return false, err
	}
	first, err := stream.Recv()
	if err != nil {
		return false, err
	}
	regd := first.GetRegistered()
	if regd == nil {
		return false, errors.New("worker: the scheduler did not accept the registration")
	}
	if !deadline.Stop() {
		return false, fmt.Errorf("worker: registering took longer than %v", registerTimeout)
	}
	interval := time.Duration(regd.HeartbeatIntervalMs) * time.Millisecond
	if interval <= 0 {
		interval = time.Second
	}
	w.log.Info("worker: registered", "node", regd.Node, "slots", reg.Slots)

	errc := make(chan error, 2)
	go func() {
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			var m *workerpb.WorkerMessage
			select {
			case r := <-send:
				m = resultsMsg(r, send)
			case <-t.C:
				m = &workerpb.WorkerMessage{Msg: &workerpb.WorkerMessage_Heartbeat{Heartbeat: &workerpb.Heartbeat{Running: w.runningOps()}}}
			case <-ctx.Done():
				errc <- ctx.Err()
				return
			}
			if err := stream.Send(m); err != nil {
				errc <- err
				return
			}
		}
	}()
	go func() {
		for {
			m, err := stream.Recv()
			if err != nil {
				errc <- err
				return
			}
			switch m := m.Msg.(type) {
			case *workerpb.SchedulerMessage_Assign:
				w.start(m.Assign, gen)
			case *workerpb.SchedulerMessage_Assignments:
				for _, a := range m.Assignments.Assigns {
					w.start(a, gen)
				}
			case *workerpb.SchedulerMessage_Acks:
				w.mu.Lock()
				for _, a := range m.Acks.Acks {
					if r := w.pending[a.Operation]; r != nil && r.lease == a.Lease {
						delete(w.pending, a.Operation)
					}
				}
				w.mu.Unlock()
			case *workerpb.SchedulerMessage_Cancel:
				w.mu.Lock()
				if j := w.running[m.Cancel.Operation]; j != nil && (m.Cancel.Lease == 0 || m.Cancel.Lease == j.lease) {
					j.cancel()
				}
				w.mu.Unlock()
			case *workerpb.SchedulerMessage_Ack:
				w.mu.Lock()
				if r := w.pending[m.Ack.Operation]; r != nil && r.lease == m.Ack.Lease {
					delete(w.pending, m.Ack.Operation)
				}
				w.mu.Unlock()
			}
		}
	}()
	return true, <-errc
}

func (w *Worker) runningOps() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	ops := make([]string, 0, len(w.running))
	for op := range w.running {
		ops = append(ops, op)
	}
	return ops
}

// start runs an assignment in the background. An assignment whose lease
// the worker has seen lately is ignored.
func (w *Worker) start(a *workerpb.Assign, gen uint64) {
	w.mu.Lock()
	if _, dup := w.seen[a.Lease]; dup || gen != w.gen {
		w.mu.Unlock()
		return
	}
	if old := w.seenRing[w.seenNext]; old != 0 {
		delete(w.seen, old)
	}
	w.seenRing[w.seenNext] = a.Lease
	w.seenNext = (w.seenNext + 1) % len(w.seenRing)
	w.seen[a.Lease] = struct{}{}
	ctx, cancel := context.WithCancel(context.Background())
	w.running[a.Operation] = &job{lease: a.Lease, cancel: cancel}
	w.mu.Unlock()
	go func() {
		defer cancel()
		data := w.execute(ctx, a)
		r := &result{lease: a.Lease, data: data}
		w.mu.Lock()
		if j := w.running[a.Operation]; j != nil && j.lease == a.Lease {
			delete(w.running, a.Operation)
		}
		w.pending[a.Operation] = r
		send := w.send
		w.mu.Unlock()
		select {
		case send <- resultMsg(a.Operation, r):
		default:
			// The session is gone or backed up: the next one sends it.
		}
	}()
}

// execute runs one action and returns the serialized ExecuteResponse;
// an error becomes the response's status.
func (w *Worker) execute(ctx context.Context, a *workerpb.Assign) []byte {
	resp, err := func() (*repb.ExecuteResponse, error) {
		fn, err := digest.FunctionFromProto(repb.DigestFunction_Value(a.DigestFunction))
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "assignment: %v", err)
		}
		ad, err := digest.Parse(fn, a.ActionHash, a.ActionSize)
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "assignment: %v", err)
		}
		return w.runner.Execute(ctx, &executor.Request{Instance: a.InstanceName, Action: ad,
			Queued: time.Unix(0, a.QueuedUnixNano), InlineStdout: a.InlineStdout, InlineStderr: a.InlineStderr})
	}()
	if err != nil {
		resp = &repb.ExecuteResponse{Status: status.Convert(err).Proto()}
		if ctx.Err() != nil {
			resp.Status = status.New(codes.Canceled, "cancelled").Proto()
		}
	}
	data, err := proto.Marshal(resp)
	if err != nil {
		data, _ = proto.Marshal(&repb.ExecuteResponse{Status: status.New(codes.Internal, fmt.Sprint(err)).Proto()})
	}
	return data
}

// maxResultsPerMessage bounds the results of one message.
const maxResultsPerMessage = 1024

// resultsMsg returns a message with r and the results waiting in send:
// results that finish together are sent together.
func resultsMsg(r *workerpb.Result, send <-chan *workerpb.Result) *workerpb.WorkerMessage {
	rs := []*workerpb.Result{r}
	for len(rs) < maxResultsPerMessage {
		select {
		case next := <-send:
			rs = append(rs, next)
		default:
			return &workerpb.WorkerMessage{Msg: &workerpb.WorkerMessage_Results{Results: &workerpb.Results{Results: rs}}}
		}
	}
	return &workerpb.WorkerMessage{Msg: &workerpb.WorkerMessage_Results{Results: &workerpb.Results{Results: rs}}}
}

func resultMsg(op string, r *result) *workerpb.Result {
	return &workerpb.Result{Operation: op, Lease: r.lease, ExecuteResponse: r.data}
}

// NoOp is a Runner that succeeds at once without running anything, for
// measuring the scheduler alone.
type NoOp struct {
	// N is the number of slots (default 64).
	N int
}

// Execute returns an empty successful result.
func (n NoOp) Execute(ctx context.Context, req *executor.Request) (*repb.ExecuteResponse, error) {
	return &repb.ExecuteResponse{Result: &repb.ActionResult{}, Status: status.New(codes.OK, "").Proto()}, nil
}

// Platform is a Linux x86-64 worker offering every common Nix system.
func (NoOp) Platform() *repb.Platform {
	return &repb.Platform{Properties: []*repb.Platform_Property{
		{Name: executor.PropISA, Value: "x86-64"}, {Name: executor.PropOSFamily, Value: "linux"},
		{Name: executor.PropNixSystem, Value: "x86_64-linux"},
	}}
}

// Slots returns N.
func (n NoOp) Slots() int {
	if n.N <= 0 {
		return 64
	}
	return n.N
}

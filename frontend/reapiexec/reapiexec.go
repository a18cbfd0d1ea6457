// Package reapiexec runs one action on a REAPI Execution service and
// follows it to the end: it resumes a dropped operation stream with
// WaitExecution by operation name, retries UNAVAILABLE (a scheduler
// failover) with backoff, and submits again when the operation is gone.
// The coordinator and the Tvix build service both run actions this way.
package reapiexec

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"

	longrunningpb "cloud.google.com/go/longrunning/autogen/longrunningpb"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// DefaultMaxRetries bounds the retries of an execution whose RPC fails
// with UNAVAILABLE or whose stream ends early.
const DefaultMaxRetries = 20

// Options tune Run. The zero value is usable.
type Options struct {
	// OnExecuting is called once, when the service reports that the
	// action runs.
	OnExecuting func()
	// MaxRetries bounds the retries (0: DefaultMaxRetries).
	MaxRetries int
	// Logger receives a debug line per resumption; nil: slog.Default().
	Logger *slog.Logger
}

// Run executes req on client and returns the operation's response. The
// caller's ctx carries the deadline and any request metadata. An error is
// the operation's error status, the last RPC error, or ctx's error.
func Run(ctx context.Context, client repb.ExecutionClient, req *repb.ExecuteRequest, opts Options) (*repb.ExecuteResponse, error) {
	maxRetries := opts.MaxRetries
	if maxRetries <= 0 {
		maxRetries = DefaultMaxRetries
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	var name string
	executing := false
	delay := 100 * time.Millisecond
	for attempt := 0; ; attempt++ {
		var stream interface {
			Recv() (*longrunningpb.Operation, error)
		}
		var err error
		if name == "" {
			stream, err = client.Execute(ctx, req)
		} else {
			stream, err = client.WaitExecution(ctx, &repb.WaitExecutionRequest{Name: name})
		}
		for err == nil {
			var op *longrunningpb.Operation
			op, err = stream.Recv()
			if err != nil {
				break
			}
			name = op.GetName()
			var meta repb.ExecuteOperationMetadata
			if op.GetMetadata().UnmarshalTo(&meta) == nil && meta.Stage == repb.ExecutionStage_EXECUTING && !executing {
				executing = true
				if opts.OnExecuting != nil {
					opts.OnExecuting()
				}
			}
			if !op.GetDone() {
				continue
			}
			if e := op.GetError(); e != nil {
				return nil, status.ErrorProto(e)
			}
			var resp repb.ExecuteResponse
			if err := op.GetResponse().UnmarshalTo(&resp); err != nil {
				return nil, fmt.Errorf("operation %s: bad response: %w", name, err)
			}
			return &resp, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		retriable := errors.Is(err, io.EOF) || status.Code(err) == codes.Unavailable
		if status.Code(err) == codes.NotFound && name != "" {
			// The operation is gone (a restarted single-node farm): submit
			// again; the action cache makes this cheap if it ran.
			name, retriable = "", true
		}
		if !retriable || attempt >= maxRetries {
			if errors.Is(err, io.EOF) {
				err = errors.New("the operation stream ended before the operation completed")
			}
			return nil, err
		}
		log.Debug("execution interrupted; resuming", "op", name, "err", err)
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(delay):
		}
		delay = min(2*delay, 5*time.Second)
	}
}

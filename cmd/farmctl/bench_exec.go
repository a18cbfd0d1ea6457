package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime/pprof"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"cloud.google.com/go/longrunning/autogen/longrunningpb"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"tvixfarm/cas/digest"
)

// bench exec measures a REAPI Execution service, any implementation: it
// uses only Capabilities, CAS FindMissingBlobs/BatchUpdateBlobs and
// Execution.Execute (WaitExecution when a server ends a stream early).
//
// Every action is unique (its Command carries a per-run, per-action
// environment variable), is sent with skip_cache_lookup and is
// do_not_cache, so none is answered from the action cache.

// execSaltVar is the environment variable that makes each action unique.
const execSaltVar = "FARMCTL_BENCH_SALT"

// execLatency summarises one latency distribution.
type execLatency struct {
	N   int           `json:"n"`
	P50 time.Duration `json:"p50_ns"`
	P90 time.Duration `json:"p90_ns"`
	P99 time.Duration `json:"p99_ns"`
	Max time.Duration `json:"max_ns"`
}

// execReport is the result of one bench exec run (the --json output).
type execReport struct {
	Farm        string   `json:"farm"`
	Instance    string   `json:"instance"`
	Mode        string   `json:"mode"`
	DigestFn    string   `json:"digest_function"`
	Platform    []string `json:"platform"`
	Actions     int      `json:"actions"`
	Warmup      int      `json:"warmup"`
	Concurrency int      `json:"concurrency"`
	Connections int      `json:"connections"`
	// Wall is from the first Execute sent to the last stream's end.
	Wall time.Duration `json:"wall_ns"`
	// Completed counts the operations that completed (done), whatever
	// their result; ActionsPerS is Completed over Wall.
	Completed   int     `json:"completed"`
	ActionsPerS float64 `json:"actions_per_s"`
	// Accept: Execute sent to the first Operation received (any stage).
	Accept execLatency `json:"accept"`
	// Dispatch: Execute sent to the first Operation in stage EXECUTING or
	// COMPLETED.
	Dispatch execLatency `json:"dispatch"`
	// EndToEnd: Execute sent to the completed Operation.
	EndToEnd execLatency `json:"end_to_end"`
	// Errors counts failed actions, by kind: rpc (the stream failed or
	// ended early), status (a non-OK ExecuteResponse or operation
	// error), exit (a non-zero exit code), result (a cached result or a
	// missing output).
	Errors      int            `json:"errors"`
	ErrorKinds  map[string]int `json:"error_kinds,omitempty"`
	FirstErrors []string       `json:"first_errors,omitempty"`
}

// platformFlag collects repeated --platform name=value.
type platformFlag []*repb.Platform_Property

func (p *platformFlag) String() string {
	var s []string
	for _, q := range *p {
		s = append(s, q.Name+"="+q.Value)
	}
	return strings.Join(s, ",")
}

func (p *platformFlag) Set(v string) error {
	name, value, ok := strings.Cut(v, "=")
	if !ok || name == "" {
		return fmt.Errorf("%q is not name=value", v)
	}
	*p = append(*p, &repb.Platform_Property{Name: name, Value: value})
	return nil
}

// execBench is one run's state.
type execBench struct {
	conns    []*grpc.ClientConn
	instance string
	fn       digest.Function
	mode     string
	timeout  time.Duration
	// actions are the action digests: warm-up first, then the timed ones.
	actions []*repb.Digest
}

// execSample is what one action measured.
type execSample struct {
	// start is when its Execute was sent, from the start of the run.
	start                 time.Duration
	accept, dispatch, e2e time.Duration
	done                  bool
	errKind               string
	err                   error
}

func benchExec(args []string) error { return runBenchExec(args, os.Stdout, os.Stderr) }

func runBenchExec(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("bench exec", flag.ContinueOnError)
	fs.SetOutput(stderr)
	farm := fs.String("farm", "127.0.0.1:8980", "REAPI endpoint (host:port)")
	instance := fs.String("instance", "", "REAPI instance name")
	actions := fs.Int("actions", 2000, "number of timed actions")
	concurrency := fs.Int("concurrency", 0, "Execute streams in flight (default 200 in noop mode, 1 in trivial mode)")
	mode := fs.String("mode", "noop", "noop: /bin/true, for executors in no-op mode; trivial: a shell that writes one output file, really run")
	var platform platformFlag
	fs.Var(&platform, "platform", "platform property name=value added to every action (repeatable; default OSFamily=linux)")
	jsonOut := fs.Bool("json", false, "print the report as one JSON object")
	timeout := fs.Duration("timeout", 60*time.Second, "deadline of each action's Execute (and of each setup RPC)")
	warmup := fs.Int("warmup", -1, "untimed actions run first (default 20 in noop mode, 3 in trivial mode)")
	conns := fs.Int("connections", 4, "gRPC connections the streams are spread over")
	fnName := fs.String("digest-function", "sha256", "sha256 or blake3")
	cpuProfile := fs.String("cpuprofile", "", "write a CPU profile of the client to this file")
	samplesOut := fs.String("samples", "", "write each timed action's measures to this file (CSV: index, start offset, accept, dispatch, end to end in µs, error)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	switch *mode {
	case "noop":
		if *concurrency == 0 {
			*concurrency = 200
		}
		if *warmup < 0 {
			*warmup = 20
		}
	case "trivial":
		if *concurrency == 0 {
			*concurrency = 1
		}
		if *warmup < 0 {
			*warmup = 3
		}
	default:
		return fmt.Errorf("--mode %q: want noop or trivial", *mode)
	}
	switch {
	case *actions <= 0:
		return errors.New("--actions must be positive")
	case *concurrency < 0:
		return errors.New("--concurrency must be positive")
	case *conns <= 0:
		return errors.New("--connections must be positive")
	case *timeout <= 0:
		return errors.New("--timeout must be positive")
	}
	fn, ok := digest.FunctionFromName(*fnName)
	if !ok {
		return fmt.Errorf("unknown digest function %q (sha256 or blake3)", *fnName)
	}
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	props := platformProps(platform)

	b := &execBench{instance: *instance, fn: fn, mode: *mode, timeout: *timeout}
	for range *conns {
		c, err := grpc.NewClient(*farm, grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20), grpc.MaxCallSendMsgSize(64<<20)))
		if err != nil {
			return err
		}
		defer c.Close()
		b.conns = append(b.conns, c)
	}
	maxBatch, err := b.checkCapabilities()
	if err != nil {
		return err
	}
	if !*jsonOut {
		fmt.Fprintf(stderr, "uploading %d actions...\n", *warmup+*actions)
	}
	if err := b.upload(*warmup+*actions, props, maxBatch); err != nil {
		return fmt.Errorf("upload: %w", err)
	}

	if *warmup > 0 {
		if !*jsonOut {
			fmt.Fprintf(stderr, "warming up with %d actions...\n", *warmup)
		}
		ws, _ := b.run(b.actions[:*warmup], min(*concurrency, *warmup))
		for i, s := range ws {
			if s.err != nil {
				return fmt.Errorf("warm-up action %d: %s: %w", i, s.errKind, s.err)
			}
		}
	}
	if !*jsonOut {
		fmt.Fprintf(stderr, "running %d actions, %d at a time...\n", *actions, *concurrency)
	}
	samples, wall := b.run(b.actions[*warmup:], *concurrency)

	rep := &execReport{Farm: *farm, Instance: *instance, Mode: *mode, DigestFn: fn.String(), Actions: *actions,
		Warmup: *warmup, Concurrency: *concurrency, Connections: *conns, Wall: wall, ErrorKinds: map[string]int{}}
	for _, p := range props {
		rep.Platform = append(rep.Platform, p.Name+"="+p.Value)
	}
	var accept, dispatch, e2e []time.Duration
	for i, s := range samples {
		if s.accept > 0 {
			accept = append(accept, s.accept)
		}
		if s.dispatch > 0 {
			dispatch = append(dispatch, s.dispatch)
		}
		if s.done {
			rep.Completed++
			e2e = append(e2e, s.e2e)
		}
		if s.err != nil {
			rep.Errors++
			rep.ErrorKinds[s.errKind]++
			if len(rep.FirstErrors) < 5 {
				rep.FirstErrors = append(rep.FirstErrors, fmt.Sprintf("action %d (%s): %s: %v", i, b.actions[*warmup+i].Hash[:12], s.errKind, s.err))
			}
		}
	}
	if wall > 0 {
		rep.ActionsPerS = float64(rep.Completed) / wall.Seconds()
	}
	rep.Accept, rep.Dispatch, rep.EndToEnd = summarizeLatency(accept), summarizeLatency(dispatch), summarizeLatency(e2e)
	if *samplesOut != "" {
		if err := writeSamples(*samplesOut, samples); err != nil {
			return err
		}
	}

	if *jsonOut {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(rep); err != nil {
			return err
		}
	} else if err := printExecReport(stdout, rep); err != nil {
		return err
	}
	if rep.Errors > 0 {
		for _, e := range rep.FirstErrors {
			fmt.Fprintf(stderr, "  %s\n", e)
		}
		return fmt.Errorf("%d of %d actions failed", rep.Errors, *actions)
	}
	return nil
}

// platformProps returns the actions' platform: OSFamily=linux unless the
// flags set OSFamily, then the flags' properties, sorted by name then
// value as REAPI requires.
func platformProps(flags platformFlag) []*repb.Platform_Property {
	props := slices.Clone([]*repb.Platform_Property(flags))
	if !slices.ContainsFunc(props, func(p *repb.Platform_Property) bool { return p.Name == "OSFamily" }) {
		props = append(props, &repb.Platform_Property{Name: "OSFamily", Value: "linux"})
	}
	slices.SortStableFunc(props, func(a, c *repb.Platform_Property) int {
		if n := strings.Compare(a.Name, c.Name); n != 0 {
			return n
		}
		return strings.Compare(a.Value, c.Value)
	})
	return slices.CompactFunc(props, func(a, c *repb.Platform_Property) bool { return a.Name == c.Name && a.Value == c.Value })
}

func (b *execBench) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), b.timeout)
}

// checkCapabilities fails unless the endpoint executes with the digest
// function, and returns its batch size limit.
func (b *execBench) checkCapabilities() (int64, error) {
	ctx, cancel := b.ctx()
	defer cancel()
	caps, err := repb.NewCapabilitiesClient(b.conns[0]).GetCapabilities(ctx, &repb.GetCapabilitiesRequest{InstanceName: b.instance})
	if err != nil {
		return 0, fmt.Errorf("capabilities: %w", err)
	}
	ec := caps.GetExecutionCapabilities()
	if !ec.GetExecEnabled() {
		return 0, fmt.Errorf("the endpoint does not offer remote execution (instance %q)", b.instance)
	}
	fns := ec.GetDigestFunctions()
	if len(fns) == 0 && ec.GetDigestFunction() != repb.DigestFunction_UNKNOWN {
		fns = []repb.DigestFunction_Value{ec.GetDigestFunction()}
	}
	if len(fns) > 0 && !slices.Contains(fns, b.fn.Proto()) {
		return 0, fmt.Errorf("the endpoint does not execute with digest function %s (it offers %v)", b.fn, fns)
	}
	maxBatch := caps.GetCacheCapabilities().GetMaxBatchTotalSizeBytes()
	if maxBatch <= 0 {
		maxBatch = 4 << 20 // the gRPC default message size
	}
	return maxBatch, nil
}

// command returns the Command of action i of a run.
func (b *execBench) command(run string, i int, props []*repb.Platform_Property) *repb.Command {
	cmd := &repb.Command{
		EnvironmentVariables: []*repb.Command_EnvironmentVariable{{Name: execSaltVar, Value: fmt.Sprintf("%s-%d", run, i)}},
		Platform:             &repb.Platform{Properties: props},
	}
	switch b.mode {
	case "noop":
		cmd.Arguments = []string{"/bin/true"}
	case "trivial":
		cmd.Arguments = []string{"/bin/sh", "-c", ": > out"}
		cmd.OutputPaths = []string{"out"}
		cmd.OutputFiles = []string{"out"} // for REAPI < 2.1 servers; ignored beside output_paths
	}
	return cmd
}

// upload stores the Commands and Actions of n unique actions.
func (b *execBench) upload(n int, props []*repb.Platform_Property, maxBatch int64) error {
	var salt [8]byte
	rand.Read(salt[:])
	run := hex.EncodeToString(salt[:])
	emptyDir := digest.Empty(b.fn).Proto()
	type blob struct {
		d    digest.Digest
		data []byte
	}
	blobs := make([]blob, 0, 2*n)
	b.actions = make([]*repb.Digest, n)
	for i := range n {
		cmdData, err := proto.Marshal(b.command(run, i, props))
		if err != nil {
			return err
		}
		cd := digest.Compute(b.fn, cmdData)
		action := &repb.Action{CommandDigest: cd.Proto(), InputRootDigest: emptyDir, DoNotCache: true,
			Platform: &repb.Platform{Properties: props}}
		actionData, err := proto.Marshal(action)
		if err != nil {
			return err
		}
		ad := digest.Compute(b.fn, actionData)
		b.actions[i] = ad.Proto()
		blobs = append(blobs, blob{cd, cmdData}, blob{ad, actionData})
	}
	cas := repb.NewContentAddressableStorageClient(b.conns[0])
	const perCall = 1000
	var missing []blob
	for start := 0; start < len(blobs); start += perCall {
		part := blobs[start:min(start+perCall, len(blobs))]
		req := &repb.FindMissingBlobsRequest{InstanceName: b.instance, DigestFunction: b.fn.Proto()}
		byHash := make(map[string]blob, len(part))
		for _, bl := range part {
			req.BlobDigests = append(req.BlobDigests, bl.d.Proto())
			byHash[bl.d.Hex()] = bl
		}
		ctx, cancel := b.ctx()
		resp, err := cas.FindMissingBlobs(ctx, req)
		cancel()
		if err != nil {
			return fmt.Errorf("FindMissingBlobs: %w", err)
		}
		for _, d := range resp.MissingBlobDigests {
			bl, ok := byHash[d.GetHash()]
			if !ok {
				return fmt.Errorf("FindMissingBlobs answered a digest not asked for: %s", d.GetHash())
			}
			missing = append(missing, bl)
		}
	}
	// Batches stay well under the limit: it counts the whole request.
	limit := maxBatch - maxBatch/8 - 1024
	for len(missing) > 0 {
		req := &repb.BatchUpdateBlobsRequest{InstanceName: b.instance, DigestFunction: b.fn.Proto()}
		var size int64
		for len(missing) > 0 && len(req.Requests) < perCall && (len(req.Requests) == 0 || size+int64(len(missing[0].data))+100 <= limit) {
			bl := missing[0]
			missing = missing[1:]
			req.Requests = append(req.Requests, &repb.BatchUpdateBlobsRequest_Request{Digest: bl.d.Proto(), Data: bl.data})
			size += int64(len(bl.data)) + 100
		}
		ctx, cancel := b.ctx()
		resp, err := cas.BatchUpdateBlobs(ctx, req)
		cancel()
		if err != nil {
			return fmt.Errorf("BatchUpdateBlobs: %w", err)
		}
		for _, r := range resp.Responses {
			if c := codes.Code(r.Status.GetCode()); c != codes.OK {
				return fmt.Errorf("BatchUpdateBlobs: blob %s: %s: %s", r.Digest.GetHash(), c, r.Status.GetMessage())
			}
		}
	}
	return nil
}

// run executes actions with c streams in flight and returns one sample
// per action and the wall time.
func (b *execBench) run(actions []*repb.Digest, c int) ([]execSample, time.Duration) {
	samples := make([]execSample, len(actions))
	clients := make([]repb.ExecutionClient, len(b.conns))
	for i, conn := range b.conns {
		clients[i] = repb.NewExecutionClient(conn)
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for g := range min(c, len(actions)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ex := clients[g%len(clients)]
			for {
				i := int(next.Add(1)) - 1
				if i >= len(actions) {
					return
				}
				t := time.Since(start)
				samples[i] = b.execute(ex, actions[i])
				samples[i].start = t
			}
		}()
	}
	wg.Wait()
	return samples, time.Since(start)
}

// execute runs one action and measures it.
func (b *execBench) execute(ex repb.ExecutionClient, ad *repb.Digest) (s execSample) {
	ctx, cancel := b.ctx()
	defer cancel()
	t0 := time.Now()
	stream, err := ex.Execute(ctx, &repb.ExecuteRequest{InstanceName: b.instance, ActionDigest: ad,
		SkipCacheLookup: true, DigestFunction: b.fn.Proto()})
	if err != nil {
		s.errKind, s.err = "rpc", err
		return s
	}
	var name string
	// A server may end a stream before the operation completes; the
	// client then waits for it by name (REAPI WaitExecution).
	const maxWaits = 3
	for waits := 0; ; {
		op, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			if name == "" || waits == maxWaits {
				s.errKind, s.err = "rpc", errors.New("the stream ended before the operation completed")
				return s
			}
			waits++
			stream, err = ex.WaitExecution(ctx, &repb.WaitExecutionRequest{Name: name})
			if err != nil {
				s.errKind, s.err = "rpc", fmt.Errorf("WaitExecution: %w", err)
				return s
			}
			continue
		}
		if err != nil {
			s.errKind, s.err = "rpc", err
			return s
		}
		el := time.Since(t0)
		name = op.GetName()
		if s.accept == 0 {
			s.accept = el
		}
		var md repb.ExecuteOperationMetadata
		stage := repb.ExecutionStage_UNKNOWN
		if op.GetMetadata().UnmarshalTo(&md) == nil {
			stage = md.Stage
		}
		if s.dispatch == 0 && (op.GetDone() || stage == repb.ExecutionStage_EXECUTING || stage == repb.ExecutionStage_COMPLETED) {
			s.dispatch = el
		}
		if !op.GetDone() {
			continue
		}
		s.done, s.e2e = true, el
		s.errKind, s.err = b.check(op)
		return s
	}
}

// check returns what is wrong with a completed operation.
func (b *execBench) check(op *longrunningpb.Operation) (string, error) {
	if e := op.GetError(); e != nil {
		return "status", status.ErrorProto(e)
	}
	var resp repb.ExecuteResponse
	if err := op.GetResponse().UnmarshalTo(&resp); err != nil {
		return "status", fmt.Errorf("operation response: %w", err)
	}
	if c := codes.Code(resp.Status.GetCode()); c != codes.OK {
		return "status", status.ErrorProto(resp.Status)
	}
	r := resp.Result
	if r == nil {
		return "status", errors.New("OK response without a result")
	}
	if r.ExitCode != 0 {
		return "exit", fmt.Errorf("exit code %d", r.ExitCode)
	}
	if resp.CachedResult {
		return "result", errors.New("answered from the action cache despite skip_cache_lookup")
	}
	if b.mode == "trivial" && !slices.ContainsFunc(r.OutputFiles, func(f *repb.OutputFile) bool { return f.Path == "out" }) {
		return "result", fmt.Errorf("output file out missing from the result (outputs %v)", r.OutputFiles)
	}
	return "", nil
}

// writeSamples writes one CSV line per action.
func writeSamples(path string, samples []execSample) error {
	var sb strings.Builder
	sb.WriteString("index,start_us,accept_us,dispatch_us,end_to_end_us,error\n")
	for i, s := range samples {
		e := ""
		if s.err != nil {
			e = strings.NewReplacer(",", ";", "\n", " ").Replace(s.errKind + ": " + s.err.Error())
		}
		fmt.Fprintf(&sb, "%d,%d,%d,%d,%d,%s\n", i, s.start.Microseconds(), s.accept.Microseconds(), s.dispatch.Microseconds(), s.e2e.Microseconds(), e)
	}
	return os.WriteFile(path, []byte(sb.String()), 0o644)
}

// summarizeLatency returns the percentiles of ds (nearest rank).
func summarizeLatency(ds []time.Duration) execLatency {
	if len(ds) == 0 {
		return execLatency{}
	}
	s := slices.Clone(ds)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	rank := func(p float64) time.Duration {
		i := int(p*float64(len(s))+0.999999) - 1
		return s[max(0, min(i, len(s)-1))]
	}
	return execLatency{N: len(s), P50: rank(0.50), P90: rank(0.90), P99: rank(0.99), Max: s[len(s)-1]}
}

func printExecReport(w io.Writer, r *execReport) error {
	inst := r.Instance
	if inst == "" {
		inst = "(default)"
	}
	fmt.Fprintf(w, "farm %s  instance %s  mode %s  platform %s\n", r.Farm, inst, r.Mode, strings.Join(r.Platform, ","))
	fmt.Fprintf(w, "%d actions (after %d warm-up), %d in flight over %d connections\n", r.Actions, r.Warmup, r.Concurrency, r.Connections)
	fmt.Fprintf(w, "completed %d in %s: %.0f actions/s; errors %d\n\n", r.Completed, fmtDur(r.Wall), r.ActionsPerS, r.Errors)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "latency\tn\tp50\tp90\tp99\tmax\n")
	for _, l := range []struct {
		name string
		l    execLatency
	}{{"accept (first Operation)", r.Accept}, {"dispatch (EXECUTING)", r.Dispatch}, {"end to end (COMPLETED)", r.EndToEnd}} {
		if l.l.N == 0 {
			fmt.Fprintf(tw, "%s\t0\t-\t-\t-\t-\n", l.name)
			continue
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\n", l.name, l.l.N, fmtDur(l.l.P50), fmtDur(l.l.P90), fmtDur(l.l.P99), fmtDur(l.l.Max))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(r.ErrorKinds) > 0 {
		var kinds []string
		for k, n := range r.ErrorKinds {
			kinds = append(kinds, fmt.Sprintf("%s %d", k, n))
		}
		sort.Strings(kinds)
		fmt.Fprintf(w, "\nerrors by kind: %s\n", strings.Join(kinds, ", "))
	}
	return nil
}

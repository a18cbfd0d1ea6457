package coordinator

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
	"tvixfarm/frontend/pathinfo"
	"tvixfarm/frontend/translate"
	storepb "tvixfarm/proto/tvixfarm/store/v1"
)

// BuildError is a derivation that failed.
type BuildError struct {
	Drv string
	// ExitCode of the builder, -1 if it did not exit.
	ExitCode int
	// Msg says what went wrong, in Nix's words where Nix has them.
	Msg string
	// Log is the digest of the builder's log, if it ran.
	Log digest.Digest
	// LogTail is the end of the log.
	LogTail []string
}

func (e *BuildError) Error() string {
	var b strings.Builder
	b.WriteString(e.Msg)
	if len(e.LogTail) > 0 {
		fmt.Fprintf(&b, ";\nlast %d log lines:", len(e.LogTail))
		for _, l := range e.LogTail {
			b.WriteString("\n> " + l)
		}
	}
	return b.String()
}

// buildOne builds one derivation whose inputs are all on the farm.
func (r *run) buildOne(ctx context.Context, n *node) error {
	d := n.drv
	roots := slices.Clone(d.InputSources)
	for in, outs := range d.InputDerivations {
		for _, o := range outs {
			roots = append(roots, r.nodes[in].drv.Outputs[o].Path)
		}
	}
	closure, err := r.closure(ctx, roots)
	if err != nil {
		return fmt.Errorf("%s: input closure: %w", d.Path, err)
	}
	act, err := translate.Translate(r.c.cfg.Translate, d, closure)
	if err != nil {
		return err
	}
	if err := r.uploadBlobs(ctx, act.Blobs); err != nil {
		return fmt.Errorf("%s: uploading the action: %w", d.Path, err)
	}
	r.mu.Lock()
	r.counts.Running++
	r.mu.Unlock()
	r.emit(Event{Kind: Started, Drv: d.Path, Name: d.Name()})
	t0 := time.Now()
	var (
		resp  *repb.ExecuteResponse
		infos []*storepb.PathInfo
	)
	for attempt := 0; ; attempt++ {
		var retry bool
		resp, infos, retry, err = r.attempt(ctx, n, act, closure, attempt > 0)
		if !retry || attempt > 0 {
			break
		}
		// A cached result whose outputs are wrong (a worker's fault
		// that was cached): run the action again.
		r.c.log.Warn("the farm's cached result is unusable; building again", "drv", d.Path, "err", err)
	}
	r.mu.Lock()
	r.counts.Running--
	r.mu.Unlock()
	if err != nil {
		return err
	}
	rec := buildRecord(d.Path, act, resp.GetResult())
	if err := r.c.farm.Store.Put(ctx, infos); err != nil {
		return fmt.Errorf("%s: registering outputs: %w", d.Path, err)
	}
	if err := r.c.farm.Store.PutBuild(ctx, rec); err != nil {
		r.c.log.Warn("storing a build record", "drv", d.Path, "err", err)
	}
	r.mu.Lock()
	for _, info := range infos {
		r.infos[info.StorePath] = info
	}
	r.counts.Built++
	if resp.GetCachedResult() {
		r.counts.Cached++
	}
	r.mu.Unlock()
	r.emit(Event{Kind: Built, Drv: d.Path, Name: d.Name(), Worker: rec.Worker, Cached: resp.GetCachedResult(), Took: time.Since(t0)})
	return nil
}

// explain rewrites the farm's errors for a Nix user.
func explain(err error) error {
	if status.Code(err) == codes.FailedPrecondition && strings.Contains(err.Error(), "no worker") {
		return fmt.Errorf("no worker of the farm can build it: %s", status.Convert(err).Message())
	}
	return err
}

// smallUpload is the size up to which an action's blobs are sent without
// asking the farm first which it lacks: a FindMissingBlobs round trip costs
// more than sending a few kilobytes again, and the farm stores only the
// blobs it lacks.
const smallUpload = 64 << 10

// uploadBlobs stores the blobs the farm lacks.
func (r *run) uploadBlobs(ctx context.Context, blobs map[digest.Digest][]byte) error {
	ds := slices.Collect(maps.Keys(blobs))
	var total int64
	for _, d := range ds {
		total += d.Size()
	}
	missing := ds
	if total > smallUpload {
		var err error
		if missing, err = findMissing(ctx, r.c.farm.CAS, ds); err != nil {
			return err
		}
	}
	if len(missing) == 0 {
		return nil
	}
	batch := make([]blobstore.Blob, len(missing))
	for i, d := range missing {
		batch[i] = blobstore.Blob{Digest: d, Data: blobs[d]}
	}
	for _, err := range blobstore.PutBatch(ctx, r.c.farm.CAS, batch) {
		if err != nil {
			return err
		}
	}
	return nil
}

// findMissing calls FindMissing once per digest function.
func findMissing(ctx context.Context, cas blobstore.BlobAccess, ds []digest.Digest) ([]digest.Digest, error) {
	var missing []digest.Digest
	for _, fn := range digest.Functions {
		var of []digest.Digest
		for _, d := range ds {
			if d.Function() == fn {
				of = append(of, d)
			}
		}
		if len(of) == 0 {
			continue
		}
		m, err := cas.FindMissing(ctx, of)
		if err != nil {
			return nil, err
		}
		missing = append(missing, m...)
	}
	return missing, nil
}

// maxLogRead bounds how much of a log is read for its tail.
const maxLogRead = 1 << 20

// logTail returns the last lines of the log d.
func (r *run) logTail(ctx context.Context, d digest.Digest) []string {
	if d.IsZero() || d.Size() == 0 {
		return nil
	}
	rc, err := r.c.farm.CAS.Get(ctx, d)
	if err != nil {
		return []string{fmt.Sprintf("(log unavailable: %v)", err)}
	}
	defer rc.Close()
	if d.Size() > maxLogRead {
		io.CopyN(io.Discard, rc, d.Size()-maxLogRead)
	}
	data, err := io.ReadAll(rc)
	if err != nil {
		return []string{fmt.Sprintf("(log unavailable: %v)", err)}
	}
	return Tail(data, r.c.cfg.LogTail)
}

// Tail returns the last n lines of a log, as Nix shows them: a pty's
// "\r\n" is a line end, and a trailing partial line counts.
func Tail(data []byte, n int) []string {
	data = bytes.ReplaceAll(data, []byte("\r\n"), []byte("\n"))
	data = bytes.TrimRight(data, "\n")
	if len(data) == 0 {
		return nil
	}
	lines := strings.Split(string(data), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return lines
}

// buildRecord describes a build of act for the path-info store.
func buildRecord(drv string, act *translate.Action, res *repb.ActionResult) *storepb.Build {
	fn := act.Digest.Function()
	rec := &storepb.Build{
		DrvPath:           drv,
		Outputs:           act.Outputs,
		LogDigestFunction: fn.String(),
		ExitCode:          res.GetExitCode(),
		Worker:            res.GetExecutionMetadata().GetWorker(),
		StartTime:         res.GetExecutionMetadata().GetExecutionStartTimestamp().AsTime().UnixNano(),
		EndTime:           res.GetExecutionMetadata().GetExecutionCompletedTimestamp().AsTime().UnixNano(),
		Action:            pathinfo.DigestProto(act.Digest),
	}
	if d, err := digest.FromProto(fn, res.GetStdoutDigest()); err == nil && !d.IsZero() {
		rec.Log = pathinfo.DigestProto(d)
	}
	return rec
}

// attempt runs the action once and checks its outputs. retry is set when
// the result came from the action cache and its outputs are unusable.
func (r *run) attempt(ctx context.Context, n *node, act *translate.Action, closure map[string]*storepb.PathInfo, skipCache bool) (resp *repb.ExecuteResponse, infos []*storepb.PathInfo, retry bool, err error) {
	d := n.drv
	resp, err = r.executeAction(ctx, n, act, -int32(min(n.rank, 1<<20)), skipCache, func() {
		r.emit(Event{Kind: Executing, Drv: d.Path, Name: d.Name()})
	})
	if err != nil {
		return nil, nil, false, fmt.Errorf("cannot build %s: %w", d.Path, explain(err))
	}
	if s := resp.GetStatus(); s.GetCode() != int32(codes.OK) {
		err := status.ErrorProto(s)
		if status.Code(err) == codes.DeadlineExceeded {
			return nil, nil, false, &BuildError{Drv: d.Path, ExitCode: -1, Msg: fmt.Sprintf("builder for '%s' timed out: %s", d.Path, s.GetMessage())}
		}
		return nil, nil, false, fmt.Errorf("cannot build %s: %w", d.Path, explain(err))
	}
	res := resp.GetResult()
	rec := buildRecord(d.Path, act, res)
	logDigest, _ := digest.FromProto(act.Digest.Function(), res.GetStdoutDigest())
	fail := func(be *BuildError) error {
		be.Drv, be.Log = d.Path, logDigest
		if be.LogTail == nil && be.ExitCode != 0 {
			be.LogTail = r.logTail(ctx, logDigest)
		}
		rec.Error = be.Msg
		if err := r.c.farm.Store.PutBuild(ctx, rec); err != nil {
			r.c.log.Warn("storing a build record", "drv", d.Path, "err", err)
		}
		return be
	}
	if res.GetExitCode() != 0 {
		return resp, nil, false, fail(&BuildError{ExitCode: int(res.GetExitCode()), Msg: fmt.Sprintf("builder for '%s' failed with exit code %d", d.Path, res.GetExitCode())})
	}
	infos, err = r.outputs(ctx, n, act, res, closure)
	if err != nil {
		if be, ok := err.(*BuildError); ok {
			return resp, nil, resp.GetCachedResult(), fail(be)
		}
		return resp, nil, false, fmt.Errorf("%s: outputs: %w", d.Path, err)
	}
	return resp, infos, false, nil
}

package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime/pprof"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/experimental"
	"google.golang.org/grpc/status"

	"tvixfarm/cas/digest"
	"tvixfarm/internal/rpc"
)

type casBench struct {
	// chunks holds a ByteStream read's chunks until they are verified
	// and given back to the codec's pool: the next read reuses them, as
	// fresh memory costs page faults that would be charged to the server
	// (on some VMs first-touch runs at ~600 MB/s).
	chunks [][]byte

	cas      repb.ContentAddressableStorageClient
	bs       bspb.ByteStreamClient
	instance string
	fn       digest.Function
	chunk    int
	timeout  time.Duration
}

// result is one measure over all runs.
type result struct {
	Name    string          `json:"name"`
	Runs    []time.Duration `json:"runs_ns"`
	Median  time.Duration   `json:"median_ns"`
	Bytes   int64           `json:"bytes,omitempty"`
	MiBps   float64         `json:"mib_per_s,omitempty"`
	Skipped string          `json:"skipped,omitempty"`
}

func benchCAS(args []string) error {
	fs := flag.NewFlagSet("bench cas", flag.ContinueOnError)
	farm := fs.String("farm", "127.0.0.1:8980", "REAPI endpoint (host:port)")
	instance := fs.String("instance", "", "REAPI instance name")
	fnName := fs.String("digest-function", "sha256", "sha256 or blake3")
	runs := fs.Int("runs", 5, "repetitions of each measure (the median is reported)")
	large := fs.Int("large-mib", 100, "size of the ByteStream blob in MiB")
	chunk := fs.Int("chunk-kib", 1024, "ByteStream chunk size in KiB")
	only := fs.String("only", "", "comma-separated measures to run (findmissing,batchupdate,batchread,bytestream; bytestream-write: the writes alone)")
	jsonOut := fs.Bool("json", false, "print results as JSON")
	cpuProfile := fs.String("cpuprofile", "", "write a CPU profile of the client to this file")
	if err := fs.Parse(args); err != nil {
		return err
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
	fn, ok := digest.FunctionFromName(*fnName)
	if !ok {
		return fmt.Errorf("unknown digest function %q (sha256 or blake3)", *fnName)
	}
	conn, err := grpc.NewClient(*farm,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20), grpc.MaxCallSendMsgSize(64<<20)),
		// Large flow-control windows, as for any bulk transfer on a fast link.
		grpc.WithInitialWindowSize(16<<20), grpc.WithInitialConnWindowSize(16<<20),
		experimental.WithBufferPool(rpc.BufferPool()))
	if err != nil {
		return err
	}
	defer conn.Close()
	b := &casBench{
		cas: repb.NewContentAddressableStorageClient(conn), bs: bspb.NewByteStreamClient(conn),
		instance: *instance, fn: fn, chunk: *chunk << 10, timeout: 2 * time.Minute,
	}
	want := func(name string) bool { return *only == "" || strings.Contains(","+*only+",", ","+name+",") }
	var results []*result
	measure := func(name string, bytes int64, f func(run int) (time.Duration, error)) error {
		r := &result{Name: name, Bytes: bytes}
		for i := 0; i < *runs; i++ {
			d, err := f(i)
			if err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
			r.Runs = append(r.Runs, d)
		}
		r.Median = median(r.Runs)
		if bytes > 0 && r.Median > 0 {
			r.MiBps = float64(bytes) / (1 << 20) / r.Median.Seconds()
		}
		results = append(results, r)
		if !*jsonOut {
			fmt.Fprintf(os.Stderr, "%-36s median %v\n", name, r.Median.Round(10*time.Microsecond))
		}
		return nil
	}
	if want("findmissing") {
		for _, n := range []int{1000, 10000} {
			if err := measure(fmt.Sprintf("FindMissingBlobs(%d new)", n), 0, func(int) (time.Duration, error) { return b.findMissing(n) }); err != nil {
				return err
			}
		}
	}
	var uploaded [][]digest.Digest
	if want("batchupdate") || want("batchread") {
		if err := measure("BatchUpdateBlobs(1000 x 100 B)", 1000*100, func(int) (time.Duration, error) {
			d, ds, err := b.batchUpdate(1000, 100)
			uploaded = append(uploaded, ds)
			return d, err
		}); err != nil {
			return err
		}
	}
	if want("batchread") {
		if err := measure("BatchReadBlobs(1000 x 100 B)", 1000*100, func(run int) (time.Duration, error) { return b.batchRead(uploaded[run]) }); err != nil {
			return err
		}
	}
	if want("bytestream") || strings.Contains(","+*only+",", ",bytestream-write,") {
		size := int64(*large) << 20
		var blobs []digest.Digest
		if err := measure(fmt.Sprintf("ByteStream write (%d MiB)", *large), size, func(int) (time.Duration, error) {
			d, dg, err := b.bsWrite(size)
			blobs = append(blobs, dg)
			return d, err
		}); err != nil {
			return err
		}
		if want("bytestream") { // not for bytestream-write, the writes alone
			if err := measure(fmt.Sprintf("ByteStream read (%d MiB)", *large), size, func(run int) (time.Duration, error) { return b.bsRead(blobs[run]) }); err != nil {
				return err
			}
		}
	}
	if *jsonOut {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(map[string]any{"farm": *farm, "digest_function": fn.String(), "runs": *runs, "results": results})
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "measure\tmedian\tmin\tmax\tthroughput\n")
	for _, r := range results {
		tp := ""
		if r.MiBps > 0 && r.Bytes >= 1<<20 {
			tp = fmt.Sprintf("%.0f MiB/s", r.MiBps)
		}
		fmt.Fprintf(tw, "%s\t%v\t%v\t%v\t%s\n", r.Name, fmtDur(r.Median), fmtDur(minDur(r.Runs)), fmtDur(maxDur(r.Runs)), tp)
	}
	return tw.Flush()
}

func (b *casBench) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), b.timeout)
}

func randomBlobs(fn digest.Function, n, size int) ([][]byte, []digest.Digest) {
	data := make([][]byte, n)
	ds := make([]digest.Digest, n)
	for i := range data {
		data[i] = make([]byte, size)
		rand.Read(data[i])
		ds[i] = digest.Compute(fn, data[i])
	}
	return data, ds
}

func protos(ds []digest.Digest) []*repb.Digest {
	out := make([]*repb.Digest, len(ds))
	for i, d := range ds {
		out[i] = d.Proto()
	}
	return out
}

func (b *casBench) findMissing(n int) (time.Duration, error) {
	_, ds := randomBlobs(b.fn, n, 32)
	req := &repb.FindMissingBlobsRequest{InstanceName: b.instance, BlobDigests: protos(ds), DigestFunction: b.fn.Proto()}
	ctx, cancel := b.ctx()
	defer cancel()
	start := time.Now()
	resp, err := b.cas.FindMissingBlobs(ctx, req)
	el := time.Since(start)
	if err != nil {
		return 0, err
	}
	if len(resp.MissingBlobDigests) != n {
		return 0, fmt.Errorf("%d of %d new digests reported missing", len(resp.MissingBlobDigests), n)
	}
	return el, nil
}

func (b *casBench) batchUpdate(n, size int) (time.Duration, []digest.Digest, error) {
	data, ds := randomBlobs(b.fn, n, size)
	req := &repb.BatchUpdateBlobsRequest{InstanceName: b.instance, DigestFunction: b.fn.Proto()}
	for i := range data {
		req.Requests = append(req.Requests, &repb.BatchUpdateBlobsRequest_Request{Digest: ds[i].Proto(), Data: data[i]})
	}
	ctx, cancel := b.ctx()
	defer cancel()
	start := time.Now()
	resp, err := b.cas.BatchUpdateBlobs(ctx, req)
	el := time.Since(start)
	if err != nil {
		return 0, nil, err
	}
	for _, r := range resp.Responses {
		if codes.Code(r.Status.GetCode()) != codes.OK {
			return 0, nil, fmt.Errorf("blob %s: %s", r.Digest.GetHash(), r.Status.GetMessage())
		}
	}
	return el, ds, nil
}

func (b *casBench) batchRead(ds []digest.Digest) (time.Duration, error) {
	req := &repb.BatchReadBlobsRequest{InstanceName: b.instance, Digests: protos(ds), DigestFunction: b.fn.Proto()}
	ctx, cancel := b.ctx()
	defer cancel()
	start := time.Now()
	resp, err := b.cas.BatchReadBlobs(ctx, req)
	el := time.Since(start)
	if err != nil {
		return 0, err
	}
	for i, r := range resp.Responses {
		if codes.Code(r.Status.GetCode()) != codes.OK {
			return 0, fmt.Errorf("blob %s: %s", r.Digest.GetHash(), r.Status.GetMessage())
		}
		if err := ds[i].Verify(r.Data); err != nil {
			return 0, err
		}
	}
	return el, nil
}

func (b *casBench) bsWrite(size int64) (time.Duration, digest.Digest, error) {
	data := make([]byte, size)
	rand.Read(data)
	d := digest.Compute(b.fn, data)
	var uuid [16]byte
	rand.Read(uuid[:])
	name := digest.WriteName(b.instance, hex.EncodeToString(uuid[:]), d, repb.Compressor_IDENTITY)
	ctx, cancel := b.ctx()
	defer cancel()
	start := time.Now()
	stream, err := b.bs.Write(ctx)
	if err != nil {
		return 0, d, err
	}
	for off := int64(0); off < size; {
		n := min(int64(b.chunk), size-off)
		req := &bspb.WriteRequest{WriteOffset: off, Data: data[off : off+n], FinishWrite: off+n == size}
		if off == 0 {
			req.ResourceName = name
		}
		// Bulk: sent from data itself, which stays untouched until the RPC ends.
		if err := stream.SendMsg(rpc.Bulk{Message: req}); err != nil {
			if err == io.EOF {
				break // the server ended the stream early; CloseAndRecv says why
			}
			return 0, d, err
		}
		off += n
	}
	resp, err := stream.CloseAndRecv()
	el := time.Since(start)
	if err != nil {
		return 0, d, err
	}
	if resp.CommittedSize != size {
		return 0, d, fmt.Errorf("committed_size %d, want %d", resp.CommittedSize, size)
	}
	return el, d, nil
}

func (b *casBench) bsRead(d digest.Digest) (time.Duration, error) {
	ctx, cancel := b.ctx()
	defer cancel()
	start := time.Now()
	stream, err := b.bs.Read(ctx, &bspb.ReadRequest{ResourceName: digest.ReadName(b.instance, d, repb.Compressor_IDENTITY)})
	if err != nil {
		return 0, err
	}
	// The chunks are kept as received (large ones in buffers of the
	// codec's pool), not copied into one: a client would write each to
	// a file as it comes, and the measure is the server's.
	chunks := b.chunks[:0]
	defer func() {
		for i, c := range chunks {
			rpc.ReleaseBuffer(c)
			chunks[i] = nil
		}
		b.chunks = chunks[:0]
	}()
	var n int64
	for {
		resp, err := stream.Recv()
		if err == io.EOF {
			break
		} else if err != nil {
			return 0, err
		}
		if n += int64(len(resp.Data)); n > d.Size() {
			return 0, status.Errorf(codes.DataLoss, "read more than %d bytes", d.Size())
		}
		chunks = append(chunks, resp.Data)
	}
	el := time.Since(start)
	// Verified after the clock stops.
	h := d.Function().New()
	for _, c := range chunks {
		h.Write(c)
	}
	var sum [digest.HashSize]byte
	if got := digest.New(d.Function(), [digest.HashSize]byte(h.Sum(sum[:0])), n); got != d {
		return 0, fmt.Errorf("read back wrong data: %v", digest.MismatchError(d, got))
	}
	return el, nil
}

func median(ds []time.Duration) time.Duration {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	if len(s) == 0 {
		return 0
	}
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func minDur(ds []time.Duration) time.Duration {
	m := ds[0]
	for _, d := range ds {
		m = min(m, d)
	}
	return m
}

func maxDur(ds []time.Duration) time.Duration {
	m := ds[0]
	for _, d := range ds {
		m = max(m, d)
	}
	return m
}

func fmtDur(d time.Duration) string {
	switch {
	case d >= time.Second:
		return fmt.Sprintf("%.2fs", d.Seconds())
	case d >= time.Millisecond:
		return fmt.Sprintf("%.2fms", float64(d)/1e6)
	}
	return fmt.Sprintf("%.0fµs", float64(d)/1e3)
}

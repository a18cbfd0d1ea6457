package gateway

import (
	"context"
	"fmt"
	"io"
	"sync"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
)

// present remembers directories whose whole subtree is in the remote's
// CAS (uploaded or found there), so that the next action with the same
// store paths does not walk and query them again. It is bounded: when
// full it starts afresh. A remote that evicts such blobs fails the action
// with MISSING, and the gateway uploads again without consulting it.
type present struct {
	mu  sync.Mutex
	max int
	set map[digest.Digest]struct{}
}

func newPresent(max int) *present { return &present{max: max, set: map[digest.Digest]struct{}{}} }

func (p *present) has(d digest.Digest) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	_, ok := p.set[d]
	return ok
}

func (p *present) add(ds []digest.Digest) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.set)+len(ds) > p.max {
		p.set = map[digest.Digest]struct{}{}
	}
	for _, d := range ds {
		p.set[d] = struct{}{}
	}
}

func (p *present) reset() {
	p.mu.Lock()
	p.set = map[digest.Digest]struct{}{}
	p.mu.Unlock()
}

// maxDirectory bounds the Directory messages the gateway reads.
const maxDirectory = 64 << 20

// upload makes the remote's CAS hold the input tree root (from local)
// and the extra blobs: one walk of the tree (skipping subtrees known to be
// there unless full), one FindMissingBlobs, then the missing blobs.
func (g *Remote) upload(ctx context.Context, local blobstore.BlobAccess, root digest.Digest, extra []blobstore.Blob, full bool) error {
	if full {
		g.known.reset()
	}
	var dirs []digest.Digest
	want := map[digest.Digest]bool{}
	mem := map[digest.Digest][]byte{}
	for _, b := range extra {
		want[b.Digest] = true
		mem[b.Digest] = b.Data
	}
	queue := []digest.Digest{root}
	seen := map[digest.Digest]bool{}
	for len(queue) > 0 {
		d := queue[len(queue)-1]
		queue = queue[:len(queue)-1]
		if seen[d] || g.known.has(d) {
			continue
		}
		seen[d] = true
		if d.Size() == 0 {
			continue // the empty Directory, an empty blob: always present
		}
		data, err := blobstore.GetBytes(ctx, local, d, maxDirectory)
		if err != nil {
			if blobstore.IsNotFound(err) {
				return missing(d)
			}
			return fmt.Errorf("directory %s: %w", d, err)
		}
		var dir repb.Directory
		if err := proto.Unmarshal(data, &dir); err != nil {
			return status.Errorf(codes.InvalidArgument, "directory %s: %v", d, err)
		}
		dirs = append(dirs, d)
		want[d] = true
		mem[d] = data
		for _, f := range dir.Files {
			fd, err := digest.FromProto(d.Function(), f.Digest)
			if err != nil {
				return fmt.Errorf("directory %s: file %q: %w", d, f.Name, err)
			}
			want[fd] = true
		}
		for _, sd := range dir.Directories {
			cd, err := digest.FromProto(d.Function(), sd.Digest)
			if err != nil {
				return fmt.Errorf("directory %s: %q: %w", d, sd.Name, err)
			}
			queue = append(queue, cd)
		}
	}
	all := make([]digest.Digest, 0, len(want))
	for d := range want {
		if d.Size() > 0 {
			all = append(all, d)
		}
	}
	missing, err := g.rcas.FindMissing(ctx, all)
	if err != nil {
		return fmt.Errorf("find missing blobs on the remote: %w", err)
	}
	if err := copyBlobsFrom(ctx, local, g.rcas, missing, mem); err != nil {
		return err
	}
	g.known.add(dirs)
	return nil
}

// treeBlobs returns the blobs of an output directory that the gateway's
// CAS needs: its Tree and the files in it, or, for a result with only
// root_directory_digest, its Directory messages and files, read one by
// one (no GetTree).
func (g *Remote) treeBlobs(ctx context.Context, od *repb.OutputDirectory) ([]digest.Digest, error) {
	fn := g.cfg.DigestFunction
	var out []digest.Digest
	files := func(dir *repb.Directory) error {
		for _, f := range dir.Files {
			d, err := digest.FromProto(fn, f.Digest)
			if err != nil {
				return fmt.Errorf("file %q: %w", f.Name, err)
			}
			out = append(out, d)
		}
		return nil
	}
	if od.TreeDigest != nil {
		td, err := digest.FromProto(fn, od.TreeDigest)
		if err != nil {
			return nil, fmt.Errorf("tree digest: %w", err)
		}
		data, err := blobstore.GetBytes(ctx, g.rcas, td, 1<<30)
		if err != nil {
			return nil, fmt.Errorf("tree %s: %w", td, err)
		}
		var tree repb.Tree
		if err := proto.Unmarshal(data, &tree); err != nil {
			return nil, fmt.Errorf("tree %s: %w", td, err)
		}
		out = append(out, td)
		for _, dir := range append([]*repb.Directory{tree.Root}, tree.Children...) {
			if err := files(dir); err != nil {
				return nil, fmt.Errorf("tree %s: %w", td, err)
			}
		}
		return out, nil
	}
	rd, err := digest.FromProto(fn, od.RootDirectoryDigest)
	if err != nil {
		return nil, fmt.Errorf("neither a tree digest nor a root directory digest: %w", err)
	}
	queue, seen := []digest.Digest{rd}, map[digest.Digest]bool{}
	for len(queue) > 0 {
		d := queue[len(queue)-1]
		queue = queue[:len(queue)-1]
		if seen[d] {
			continue
		}
		seen[d] = true
		if d.Size() == 0 {
			continue
		}
		data, err := blobstore.GetBytes(ctx, g.rcas, d, maxDirectory)
		if err != nil {
			return nil, fmt.Errorf("directory %s: %w", d, err)
		}
		var dir repb.Directory
		if err := proto.Unmarshal(data, &dir); err != nil {
			return nil, fmt.Errorf("directory %s: %w", d, err)
		}
		out = append(out, d)
		if err := files(&dir); err != nil {
			return nil, fmt.Errorf("directory %s: %w", d, err)
		}
		for _, sd := range dir.Directories {
			cd, err := digest.FromProto(fn, sd.Digest)
			if err != nil {
				return nil, fmt.Errorf("directory %s: %w", d, err)
			}
			queue = append(queue, cd)
		}
	}
	return out, nil
}

// copyBlobs copies the blobs of ds that dst lacks from src.
func copyBlobs(ctx context.Context, src, dst blobstore.BlobAccess, ds []digest.Digest) error {
	missing, err := dst.FindMissing(ctx, dedup(ds))
	if err != nil {
		return fmt.Errorf("find missing blobs: %w", err)
	}
	return copyBlobsFrom(ctx, src, dst, missing, nil)
}

func dedup(ds []digest.Digest) []digest.Digest {
	seen := make(map[digest.Digest]bool, len(ds))
	out := ds[:0:0]
	for _, d := range ds {
		if !seen[d] && d.Size() > 0 {
			seen[d] = true
			out = append(out, d)
		}
	}
	return out
}

// smallBlob is the size below which blobs are copied in batches, held in
// memory.
const smallBlob = 1 << 20

// copyBlobsFrom copies ds from src (or from mem, which holds some of
// them) to dst: small blobs read into memory and stored with PutBatch
// (batched within the server's limits), large ones streamed one by one,
// a few at a time.
func copyBlobsFrom(ctx context.Context, src, dst blobstore.BlobAccess, ds []digest.Digest, mem map[digest.Digest][]byte) error {
	var small, large []digest.Digest
	for _, d := range ds {
		if d.Size() < smallBlob || mem[d] != nil {
			small = append(small, d)
		} else {
			large = append(large, d)
		}
	}
	// Small blobs, in rounds of at most 16 MiB in memory.
	for len(small) > 0 {
		var round []digest.Digest
		var bytes int64
		for len(small) > 0 && (bytes < 16<<20) {
			round = append(round, small[0])
			bytes += small[0].Size()
			small = small[1:]
		}
		batch := make([]blobstore.Blob, len(round))
		errs := make([]error, len(round))
		blobstore.ParallelFor(len(round), func(i int) {
			d := round[i]
			if data, ok := mem[d]; ok {
				batch[i] = blobstore.Blob{Digest: d, Data: data}
				return
			}
			data, err := blobstore.GetBytes(ctx, src, d, smallBlob)
			batch[i], errs[i] = blobstore.Blob{Digest: d, Data: data}, err
		})
		for i, err := range errs {
			if err != nil {
				return fmt.Errorf("read %s: %w", round[i], err)
			}
		}
		for i, err := range blobstore.PutBatch(ctx, dst, batch) {
			if err != nil {
				return fmt.Errorf("write %s: %w", batch[i].Digest, err)
			}
		}
	}
	errs := make([]error, len(large))
	sem := make(chan struct{}, 4)
	var wg sync.WaitGroup
	for i, d := range large {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			errs[i] = copyOne(ctx, src, dst, d)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			return fmt.Errorf("copy %s: %w", large[i], err)
		}
	}
	return nil
}

// copyOne streams one blob, starting again (a few times) when the write
// fails with UNAVAILABLE: a stream that is not rewindable is not retried
// by the store itself.
func copyOne(ctx context.Context, src, dst blobstore.BlobAccess, d digest.Digest) error {
	var err error
	for attempt := 0; attempt < 3; attempt++ {
		var r io.ReadCloser
		if r, err = src.Get(ctx, d); err != nil {
			return err
		}
		err = dst.Put(ctx, d, r)
		r.Close()
		if status.Code(err) != codes.Unavailable {
			return err
		}
	}
	return err
}

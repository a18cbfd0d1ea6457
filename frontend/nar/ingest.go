package nar

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
)

const (
	// keepBelow is the size below which Ingest keeps file contents in
	// memory for Upload, up to keepBudget bytes in all; other files are
	// read again from disk.
	keepBelow  = 256 << 10
	keepBudget = 64 << 20
	// batchBelow is the size below which Upload sends blobs in batches
	// rather than streaming them, and maxBatchBytes and maxBatchBlobs
	// bound a batch.
	batchBelow    = 1 << 20
	maxBatchBytes = 4 << 20
	maxBatchBlobs = 1000
	// uploadConcurrency bounds the batches and streams Upload runs at once.
	uploadConcurrency = 8
)

// Blob is a blob a Node needs in the CAS: its contents in memory, or the
// local file that holds them.
type Blob struct {
	Digest digest.Digest
	// Data holds the contents, if they are in memory.
	Data []byte
	// Path is the file holding the contents when Data is nil.
	Path string
}

// Ingested is a local store path read by Ingest.
type Ingested struct {
	// Node is the path's Node.
	Node Node
	// NarHash and NarSize are the SHA-256 and size of its NAR.
	NarHash [32]byte
	NarSize uint64
	// Blobs are the distinct blobs Node needs, without the empty blob:
	// the deterministically serialized Directory messages (in memory) and
	// the file contents (small ones in memory, others by path).
	Blobs []Blob
}

// Ingest reads the local file, directory or symlink at root (a store path
// in the local /nix/store) and returns its REAPI Node under digest
// function fn, every blob the Node needs, and its NAR hash and size, all
// in one pass over the files. Like Dump, it does not follow a symlink at
// root, sorts entries by the raw bytes of their names, and makes a file
// executable iff its owner execute bit is set. Names and symlink targets
// that are not valid UTF-8 cannot be represented in REAPI's string
// fields: they are errors naming the path, quoted with %q.
func Ingest(ctx context.Context, root string, fn digest.Function) (*Ingested, error) {
	if fn != digest.SHA256 && fn != digest.BLAKE3 {
		return nil, fmt.Errorf("nar: unsupported digest function %s", fn)
	}
	root = filepath.Clean(root)
	h, _ := NewHasher(nil)
	ing := &ingester{fn: fn, idx: make(map[digest.Digest]int)}
	fw := &fsWalker{ctx: ctx, nw: newNarWriter(h), ing: ing}
	defer fw.nw.release()
	fw.nw.raw(tokMagic)
	n, err := fw.walk(unix.AT_FDCWD, root, root, 0)
	if err != nil {
		return nil, err
	}
	if err := fw.nw.flush(); err != nil {
		return nil, err
	}
	res := &Ingested{Node: n, Blobs: ing.blobs}
	res.NarHash, res.NarSize, _ = h.Sum()
	return res, nil
}

// ingester collects the blobs of an Ingest.
type ingester struct {
	fn    digest.Function
	blobs []Blob
	idx   map[digest.Digest]int
	kept  int64
}

// add adds b unless it is empty or known; a copy in memory replaces a
// path.
func (in *ingester) add(b Blob) {
	if b.Digest.Size() == 0 {
		return
	}
	if i, ok := in.idx[b.Digest]; ok {
		if in.blobs[i].Data == nil && b.Data != nil {
			in.blobs[i] = b
		}
		return
	}
	in.idx[b.Digest] = len(in.blobs)
	in.blobs = append(in.blobs, b)
}

// addFile adds the contents of the file at path, keeping a copy of data
// (the contents of a small file, in a reused buffer) within the budget.
func (in *ingester) addFile(d digest.Digest, data []byte, path string) {
	if _, ok := in.idx[d]; ok || d.Size() == 0 {
		return
	}
	if data != nil && d.Size() < keepBelow && in.kept+d.Size() <= keepBudget {
		in.kept += d.Size()
		in.add(Blob{Digest: d, Data: bytes.Clone(data)})
		return
	}
	in.add(Blob{Digest: d, Path: path})
}

// Upload stores the blobs of ing that cas lacks: one FindMissing call,
// then small blobs in batches and large files streamed from disk, up to 8
// operations at once. The CAS verifies every blob against its digest, so a
// file changed since Ingest read it fails the upload.
func Upload(ctx context.Context, cas blobstore.BlobAccess, ing *Ingested) error {
	if len(ing.Blobs) == 0 {
		return nil
	}
	ds := make([]digest.Digest, len(ing.Blobs))
	for i, b := range ing.Blobs {
		ds[i] = b.Digest
	}
	missing, err := cas.FindMissing(ctx, ds)
	if err != nil {
		return fmt.Errorf("nar: find missing blobs: %w", err)
	}
	want := make(map[digest.Digest]bool, len(missing))
	for _, d := range missing {
		want[d] = true
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(uploadConcurrency)
	var batch []Blob
	var batchBytes int64
	flush := func() {
		b := batch
		batch, batchBytes = nil, 0
		g.Go(func() error { return putSmall(gctx, cas, b) })
	}
	for _, b := range ing.Blobs {
		if !want[b.Digest] {
			continue
		}
		if b.Digest.Size() >= batchBelow {
			g.Go(func() error { return putLarge(gctx, cas, b) })
			continue
		}
		if len(batch) > 0 && (batchBytes+b.Digest.Size() > maxBatchBytes || len(batch) >= maxBatchBlobs) {
			flush()
		}
		batch = append(batch, b)
		batchBytes += b.Digest.Size()
	}
	if len(batch) > 0 {
		flush()
	}
	return g.Wait()
}

// putSmall uploads a batch of small blobs, reading those not in memory.
func putSmall(ctx context.Context, cas blobstore.BlobAccess, batch []Blob) error {
	bs := make([]blobstore.Blob, len(batch))
	for i, b := range batch {
		data := b.Data
		if data == nil {
			var err error
			if data, err = os.ReadFile(b.Path); err != nil {
				return fmt.Errorf("nar: upload %q: %w", b.Path, err)
			}
		}
		bs[i] = blobstore.Blob{Digest: b.Digest, Data: data}
	}
	for i, err := range blobstore.PutBatch(ctx, cas, bs) {
		if err != nil {
			return fmt.Errorf("nar: upload %s: %w", batch[i].name(), err)
		}
	}
	return nil
}

// putLarge uploads one large blob, streaming it from its file.
func putLarge(ctx context.Context, cas blobstore.BlobAccess, b Blob) error {
	if b.Data != nil {
		if err := cas.Put(ctx, b.Digest, bytes.NewReader(b.Data)); err != nil {
			return fmt.Errorf("nar: upload %s: %w", b.name(), err)
		}
		return nil
	}
	f, err := os.Open(b.Path)
	if err != nil {
		return fmt.Errorf("nar: upload %q: %w", b.Path, err)
	}
	defer f.Close()
	if err := cas.Put(ctx, b.Digest, f); err != nil {
		return fmt.Errorf("nar: upload %s: %w", b.name(), err)
	}
	return nil
}

// name describes b in errors.
func (b Blob) name() string {
	if b.Data == nil {
		return fmt.Sprintf("%q (%s)", b.Path, b.Digest)
	}
	return "blob " + b.Digest.String()
}

// putBlobs stores blobs held in memory, in batches.
func putBlobs(ctx context.Context, cas blobstore.BlobAccess, blobs []blobstore.Blob) error {
	for len(blobs) > 0 {
		n, size := 0, int64(0)
		for n < len(blobs) && n < maxBatchBlobs && (n == 0 || size+blobs[n].Digest.Size() <= maxBatchBytes) {
			size += blobs[n].Digest.Size()
			n++
		}
		for i, err := range blobstore.PutBatch(ctx, cas, blobs[:n]) {
			if err != nil {
				return fmt.Errorf("upload directory %s: %w", blobs[i].Digest, err)
			}
		}
		blobs = blobs[n:]
	}
	return nil
}

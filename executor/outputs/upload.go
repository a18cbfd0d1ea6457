package outputs

import (
	"bytes"
	"context"
	"fmt"
	"io"

	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
)

const (
	// maxBatchBytes and maxBatchBlobs bound one PutBatch call, and with
	// the concurrency the small blobs held in memory for upload.
	maxBatchBytes = 4 << 20
	maxBatchBlobs = 1000
)

// blob is a blob to upload: data, or else the contents of file.
type blob struct {
	d    digest.Digest
	data []byte
	file *file
}

// name describes b in errors.
func (b blob) name() string {
	if b.file != nil {
		return "output " + b.file.rel
	}
	return "blob " + b.d.String()
}

// blobSet is a list of distinct blobs, without the empty blob.
type blobSet struct {
	list []blob
	idx  map[digest.Digest]int
}

func (s *blobSet) add(b blob) {
	if b.d == digest.Empty(b.d.Function()) {
		return
	}
	if s.idx == nil {
		s.idx = make(map[digest.Digest]int)
	}
	if i, ok := s.idx[b.d]; ok {
		if s.list[i].data == nil && b.data != nil {
			s.list[i] = b // Prefer a copy in memory to reading a file.
		}
		return
	}
	s.idx[b.d] = len(s.list)
	s.list = append(s.list, b)
}

// upload stores the blobs that cas is missing: small ones in batches,
// large ones streamed, up to concurrency operations at once.
func upload(ctx context.Context, cas blobstore.BlobAccess, root int, blobs []blob, concurrency int, stats *Stats) error {
	if len(blobs) == 0 {
		return nil
	}
	ds := make([]digest.Digest, len(blobs))
	for i, b := range blobs {
		ds[i] = b.d
	}
	missing, err := cas.FindMissing(ctx, ds)
	if err != nil {
		return fmt.Errorf("find missing blobs: %w", err)
	}
	want := make(map[digest.Digest]bool, len(missing))
	for _, d := range missing {
		want[d] = true
	}
	g, ctx := errgroup.WithContext(ctx)
	g.SetLimit(concurrency)
	var batch []blob
	var batchBytes int64
	flush := func() {
		b := batch
		batch, batchBytes = nil, 0
		g.Go(func() error { return putSmall(ctx, cas, root, b) })
	}
	for _, b := range blobs {
		if !want[b.d] {
			stats.PresentBlobs++
			continue
		}
		stats.UploadedBlobs++
		stats.UploadedBytes += b.d.Size()
		if b.d.Size() >= smallBlobSize {
			g.Go(func() error { return putLarge(ctx, cas, root, b) })
			continue
		}
		if len(batch) > 0 && (batchBytes+b.d.Size() > maxBatchBytes || len(batch) >= maxBatchBlobs) {
			flush()
		}
		batch = append(batch, b)
		batchBytes += b.d.Size()
	}
	if len(batch) > 0 {
		flush()
	}
	return g.Wait()
}

// putSmall uploads a batch of small blobs, reading those not in memory.
func putSmall(ctx context.Context, cas blobstore.BlobAccess, root int, batch []blob) error {
	bs := make([]blobstore.Blob, len(batch))
	for i, b := range batch {
		data := b.data
		if data == nil {
			var err error
			if data, err = readSmall(root, b.file, b.d.Size()); err != nil {
				return err
			}
		}
		bs[i] = blobstore.Blob{Digest: b.d, Data: data}
	}
	for i, err := range blobstore.PutBatch(ctx, cas, bs) {
		if err != nil {
			return fmt.Errorf("upload %s: %w", batch[i].name(), err)
		}
	}
	return nil
}

// putLarge uploads one large blob, streaming it from its file.
func putLarge(ctx context.Context, cas blobstore.BlobAccess, root int, b blob) error {
	if b.data != nil {
		if err := cas.Put(ctx, b.d, bytes.NewReader(b.data)); err != nil {
			return fmt.Errorf("upload %s: %w", b.name(), err)
		}
		return nil
	}
	fd, err := reopen(root, b.file)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := cas.Put(ctx, b.d, fdReader{fd}); err != nil {
		return fmt.Errorf("upload %s: %w", b.name(), err)
	}
	return nil
}

// readSmall reads the contents of f, which had size bytes when hashed.
func readSmall(root int, f *file, size int64) ([]byte, error) {
	fd, err := reopen(root, f)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	buf := make([]byte, size+1)
	n, err := readFull(fdReader{fd}, buf)
	if err != nil {
		return nil, fmt.Errorf("output %s: %w", f.rel, err)
	}
	if int64(n) != size {
		return nil, status.Errorf(codes.FailedPrecondition, "output %s: changed size since it was hashed", f.rel)
	}
	return buf[:n], nil
}

// reopen opens f again to upload it, checking it is the file that was
// hashed. Put verifies the contents.
func reopen(root int, f *file) (int, error) {
	fd, st, err := openFile(root, f.rel)
	if err != nil {
		return -1, fmt.Errorf("output %s: open for upload: %w", f.rel, err)
	}
	if st.Dev != f.dev || st.Ino != f.ino {
		unix.Close(fd)
		return -1, status.Errorf(codes.FailedPrecondition, "output %s: replaced since it was hashed", f.rel)
	}
	return fd, nil
}

// UploadFile stores the regular file at path in cas under fn, unless cas
// has it already, and returns its digest; the executor uses it for the
// stdout and stderr of actions. The file is streamed, never held in memory
// whole. The last component of path must not be a symlink; the others are
// trusted. The empty file yields the empty digest and is not uploaded.
func UploadFile(ctx context.Context, cas blobstore.BlobAccess, fn digest.Function, path string) (digest.Digest, error) {
	if err := checkFunction(fn); err != nil {
		return digest.Digest{}, err
	}
	fd, _, err := openFileAt(unix.AT_FDCWD, path)
	if err != nil {
		return digest.Digest{}, fmt.Errorf("%s: %w", path, err)
	}
	defer unix.Close(fd)
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	d, data, err := hashFD(ctx, fn, fd, *bp)
	if err != nil {
		return digest.Digest{}, fmt.Errorf("%s: %w", path, err)
	}
	var r io.Reader
	if data != nil {
		r = bytes.NewReader(data)
	} else if _, err := unix.Seek(fd, 0, io.SeekStart); err != nil {
		return digest.Digest{}, fmt.Errorf("%s: %w", path, err)
	} else {
		r = fdReader{fd}
	}
	if err := putIfMissing(ctx, cas, d, r); err != nil {
		return digest.Digest{}, fmt.Errorf("%s: %w", path, err)
	}
	return d, nil
}

// UploadBytes stores data in cas under fn, unless cas has it already, and
// returns its digest. The empty blob is not uploaded.
func UploadBytes(ctx context.Context, cas blobstore.BlobAccess, fn digest.Function, data []byte) (digest.Digest, error) {
	if err := checkFunction(fn); err != nil {
		return digest.Digest{}, err
	}
	d := digest.Compute(fn, data)
	if err := putIfMissing(ctx, cas, d, bytes.NewReader(data)); err != nil {
		return digest.Digest{}, err
	}
	return d, nil
}

// putIfMissing stores the blob d, read from r, unless it is empty or cas
// has it.
func putIfMissing(ctx context.Context, cas blobstore.BlobAccess, d digest.Digest, r io.Reader) error {
	if d == digest.Empty(d.Function()) {
		return nil
	}
	missing, err := cas.FindMissing(ctx, []digest.Digest{d})
	if err != nil {
		return fmt.Errorf("find missing blobs: %w", err)
	}
	if len(missing) == 0 {
		return nil
	}
	if err := cas.Put(ctx, d, r); err != nil {
		return fmt.Errorf("upload %s: %w", d, err)
	}
	return nil
}

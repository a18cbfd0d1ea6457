package castore

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"

	"github.com/zeebo/blake3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
	castorepb "tvixfarm/proto/tvix/castore/v1"
)

// Limits of the store.
const (
	// MaxDirectorySize bounds one encoded Directory message (Rust clients
	// decode at most 4 MiB per message).
	MaxDirectorySize = 4 << 20
	// MaxClosureBytes bounds the encoded directories of one
	// PutDirectories, which are buffered until the closure is validated.
	MaxClosureBytes = 512 << 20
	// spoolInMemory is the size up to which PutBlob buffers in memory;
	// larger blobs are spooled to a file.
	spoolInMemory = 8 << 20
)

// Store is castore on a CAS: blobs and Directory messages are BLAKE3 blobs
// of cas. The action-cache-kind store ac holds derived records: the
// mapping between castore and REAPI trees (reapi.go). Errors are gRPC
// status errors.
type Store struct {
	cas, ac  blobstore.BlobAccess
	spoolDir string
}

// NewStore returns a Store on cas (which must implement
// blobstore.HashLookup to find blobs without their size) and ac. Blobs
// put larger than 8 MiB are spooled to files in spoolDir (os.TempDir()
// when empty) until their digest is known.
func NewStore(cas, ac blobstore.BlobAccess, spoolDir string) *Store {
	return &Store{cas: cas, ac: ac, spoolDir: spoolDir}
}

// CAS returns the store's CAS.
func (s *Store) CAS() blobstore.BlobAccess { return s.cas }

func toHash(h []byte) ([DigestLen]byte, error) {
	if len(h) != DigestLen {
		return [DigestLen]byte{}, status.Errorf(codes.InvalidArgument, "invalid digest length %d, want %d", len(h), DigestLen)
	}
	return [DigestLen]byte(h), nil
}

// StatBlob returns the CAS digest of the blob with BLAKE3 hash h, or
// NotFound. The empty blob always exists.
func (s *Store) StatBlob(ctx context.Context, h [DigestLen]byte) (digest.Digest, error) {
	if h == EmptyDigest {
		return digest.Empty(digest.BLAKE3), nil
	}
	d, err := blobstore.LookupHash(ctx, s.cas, h)
	if err != nil {
		return digest.Digest{}, err
	}
	return d, nil
}

// OpenBlob returns a reader of the blob with hash h and its digest.
func (s *Store) OpenBlob(ctx context.Context, h [DigestLen]byte) (io.ReadCloser, digest.Digest, error) {
	d, err := s.StatBlob(ctx, h)
	if err != nil {
		return nil, digest.Digest{}, err
	}
	if d.Size() == 0 {
		return io.NopCloser(bytes.NewReader(nil)), d, nil
	}
	rc, err := s.cas.Get(ctx, d)
	if err != nil {
		return nil, digest.Digest{}, err
	}
	return rc, d, nil
}

// PutBlob reads r to io.EOF and stores what it read as a BLAKE3 blob of
// the CAS, returning its digest. If r fails, nothing is stored.
func (s *Store) PutBlob(ctx context.Context, r io.Reader) (digest.Digest, error) {
	sp := &spooler{h: blake3.New(), dir: s.spoolDir}
	defer sp.close()
	if _, err := io.Copy(sp, r); err != nil {
		if _, ok := status.FromError(err); ok {
			return digest.Digest{}, err
		}
		return digest.Digest{}, spoolError(err)
	}
	d := digest.New(digest.BLAKE3, [DigestLen]byte(sp.h.Sum(nil)), sp.n)
	if sp.n == 0 {
		return d, nil
	}
	var body io.Reader = bytes.NewReader(sp.mem)
	if sp.f != nil {
		if _, err := sp.f.Seek(0, io.SeekStart); err != nil {
			return digest.Digest{}, spoolError(err)
		}
		body = sp.f
	}
	if err := s.cas.Put(ctx, d, body); err != nil {
		return digest.Digest{}, fmt.Errorf("castore: put blob %s: %w", d, err)
	}
	return d, nil
}

// spooler hashes what is written and keeps it: in memory up to
// spoolInMemory bytes, then in a temporary file.
type spooler struct {
	h   *blake3.Hasher
	n   int64
	mem []byte
	dir string
	f   *os.File
}

func (sp *spooler) Write(p []byte) (int, error) {
	sp.h.Write(p)
	sp.n += int64(len(p))
	if sp.f == nil && sp.n <= spoolInMemory {
		sp.mem = append(sp.mem, p...)
		return len(p), nil
	}
	if sp.f == nil {
		f, err := os.CreateTemp(sp.dir, "castore-put-*")
		if err != nil {
			return 0, err
		}
		sp.f = f
		if _, err := f.Write(sp.mem); err != nil {
			return 0, err
		}
		sp.mem = nil
	}
	return sp.f.Write(p)
}

func (sp *spooler) close() {
	if sp.f != nil {
		sp.f.Close()
		os.Remove(sp.f.Name())
	}
}

func spoolError(err error) error {
	return status.Errorf(codes.Internal, "castore: spool blob: %v", err)
}

// GetDirectory returns the Directory with digest h, or NotFound. The
// empty Directory always exists.
func (s *Store) GetDirectory(ctx context.Context, h [DigestLen]byte) (*castorepb.Directory, error) {
	if h == EmptyDigest {
		return &castorepb.Directory{}, nil
	}
	d, err := blobstore.LookupHash(ctx, s.cas, h)
	if err != nil {
		if blobstore.IsNotFound(err) {
			return nil, status.Errorf(codes.NotFound, "castore: directory %s not found", hexDigest(h[:]))
		}
		return nil, err
	}
	data, err := blobstore.GetBytes(ctx, s.cas, d, MaxDirectorySize)
	if err != nil {
		return nil, fmt.Errorf("castore: directory %s: %w", hexDigest(h[:]), err)
	}
	var dir castorepb.Directory
	if err := proto.Unmarshal(data, &dir); err != nil {
		return nil, status.Errorf(codes.DataLoss, "castore: blob %s is not a Directory: %v", hexDigest(h[:]), err)
	}
	return &dir, nil
}

// WalkDirectories calls yield with the directory root, then with every
// directory below it in breadth-first order, each digest once (the order
// Tvix clients check). A missing root yields nothing and no error; a
// missing subdirectory is a DataLoss error.
func (s *Store) WalkDirectories(ctx context.Context, root [DigestLen]byte, yield func(*castorepb.Directory) error) error {
	dir, err := s.GetDirectory(ctx, root)
	if err != nil {
		if status.Code(err) == codes.NotFound {
			return nil
		}
		return err
	}
	seen := map[[DigestLen]byte]bool{root: true}
	queue := []*castorepb.Directory{dir}
	for len(queue) > 0 {
		dir := queue[0]
		queue = queue[1:]
		if err := yield(dir); err != nil {
			return err
		}
		for _, c := range dir.Directories {
			h, err := toHash(c.Digest)
			if err != nil {
				return status.Errorf(codes.DataLoss, "castore: stored directory has %q with %v", c.Name, err)
			}
			if seen[h] {
				continue
			}
			seen[h] = true
			cd, err := s.GetDirectory(ctx, h)
			if err != nil {
				if status.Code(err) == codes.NotFound {
					return status.Errorf(codes.DataLoss, "castore: inconsistent store: directory %s (%q) is missing", hexDigest(h[:]), c.Name)
				}
				return err
			}
			queue = append(queue, cd)
		}
	}
	return nil
}

// Closure collects the directories of one PutDirectories, checking each
// as it arrives.
type Closure struct {
	dirs  map[[DigestLen]byte]*pending
	order [][DigestLen]byte
	last  [DigestLen]byte
	bytes int
}

type pending struct {
	data     []byte
	children [][DigestLen]byte
	names    [][]byte
}

// NewClosure returns an empty closure.
func NewClosure() *Closure {
	return &Closure{dirs: map[[DigestLen]byte]*pending{}}
}

// Add validates d and adds it. The last directory added is the root.
// Errors are InvalidArgument.
func (c *Closure) Add(d *castorepb.Directory) error {
	if err := Validate(d); err != nil {
		return status.Errorf(codes.InvalidArgument, "castore: directory %d of the stream: %v", len(c.order)+1, err)
	}
	h, data, err := Digest(d)
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "castore: %v", err)
	}
	if len(data) > MaxDirectorySize {
		return status.Errorf(codes.InvalidArgument, "castore: directory %s is %d bytes, at most %d", hexDigest(h[:]), len(data), MaxDirectorySize)
	}
	c.last = h
	if _, ok := c.dirs[h]; ok {
		return nil // duplicates are ignored
	}
	c.bytes += len(data)
	if c.bytes > MaxClosureBytes {
		return status.Errorf(codes.InvalidArgument, "castore: the directories of one Put exceed %d bytes", MaxClosureBytes)
	}
	p := &pending{data: data}
	for _, n := range d.Directories {
		p.children = append(p.children, [DigestLen]byte(n.Digest))
		p.names = append(p.names, n.Name)
	}
	c.dirs[h] = p
	c.order = append(c.order, h)
	return nil
}

// Len returns the number of distinct directories added.
func (c *Closure) Len() int { return len(c.order) }

// PutDirectories stores the closure c and returns its root, the last
// directory added. Every directory a directory of c refers to must be in c
// or already stored (then with its own closure, which the store keeps
// leaves first); every directory of c must be reachable from the root.
// Otherwise it is InvalidArgument and nothing is stored. Directories are
// stored leaves first, so a stored directory's closure is always stored.
// The subdirectory sizes of c are accepted as sent.
func (s *Store) PutDirectories(ctx context.Context, c *Closure) ([DigestLen]byte, error) {
	if len(c.order) == 0 {
		return [DigestLen]byte{}, status.Error(codes.InvalidArgument, "castore: no directories sent")
	}
	root := c.last
	// Reachability from the root, and the references outside the stream.
	height := map[[DigestLen]byte]int{}
	outside := map[[DigestLen]byte][]byte{}
	var visit func(h [DigestLen]byte, depth int) (int, error)
	visit = func(h [DigestLen]byte, depth int) (int, error) {
		if ht, ok := height[h]; ok {
			if ht < 0 {
				return 0, status.Errorf(codes.InvalidArgument, "castore: directory %s refers to itself", hexDigest(h[:]))
			}
			return ht, nil
		}
		if depth > 4096 {
			return 0, status.Error(codes.InvalidArgument, "castore: directories nested deeper than 4096")
		}
		p := c.dirs[h]
		height[h] = -1
		ht := 0
		for i, ch := range p.children {
			if _, ok := c.dirs[ch]; !ok {
				if ch != EmptyDigest {
					if _, ok := outside[ch]; !ok {
						outside[ch] = p.names[i]
					}
				}
				continue
			}
			cht, err := visit(ch, depth+1)
			if err != nil {
				return 0, err
			}
			ht = max(ht, cht+1)
		}
		height[h] = ht
		return ht, nil
	}
	if _, err := visit(root, 0); err != nil {
		return root, err
	}
	if len(height) != len(c.dirs) {
		for _, h := range c.order {
			if _, ok := height[h]; !ok {
				return root, status.Errorf(codes.InvalidArgument, "castore: directory %s is not below the root %s (the root is the last directory sent)", hexDigest(h[:]), hexDigest(root[:]))
			}
		}
	}
	for h, name := range outside {
		if _, err := blobstore.LookupHash(ctx, s.cas, h); err != nil {
			if blobstore.IsNotFound(err) {
				return root, status.Errorf(codes.InvalidArgument, "castore: directory %q (%s) is referenced but was neither sent before nor stored", name, hexDigest(h[:]))
			}
			return root, err
		}
	}
	// Commit, leaves first, one batch per height.
	var blobs []leveled
	for _, h := range c.order {
		if h != EmptyDigest {
			blobs = append(blobs, leveled{height[h], blobstore.Blob{Digest: digest.New(digest.BLAKE3, h, int64(len(c.dirs[h].data))), Data: c.dirs[h].data}})
		}
	}
	if err := s.putLeavesFirst(ctx, blobs); err != nil {
		return root, fmt.Errorf("castore: put directories: %w", err)
	}
	return root, nil
}

// leveled is a Directory blob and its height (0 for a directory without
// subdirectories).
type leveled struct {
	height int
	blob   blobstore.Blob
}

// putLeavesFirst stores the blobs of a tree that the CAS lacks, one batch
// per height from the leaves up, so that a directory is never visible
// before its subdirectories.
func (s *Store) putLeavesFirst(ctx context.Context, blobs []leveled) error {
	levels := map[int][]blobstore.Blob{}
	maxHt := 0
	for _, b := range blobs {
		levels[b.height] = append(levels[b.height], b.blob)
		maxHt = max(maxHt, b.height)
	}
	for ht := 0; ht <= maxHt; ht++ {
		if len(levels[ht]) == 0 {
			continue
		}
		missing, err := s.cas.FindMissing(ctx, digestsOf(levels[ht]))
		if err != nil {
			return err
		}
		miss := make(map[digest.Digest]bool, len(missing))
		for _, d := range missing {
			miss[d] = true
		}
		var put []blobstore.Blob
		for _, b := range levels[ht] {
			if miss[b.Digest] {
				put = append(put, b)
			}
		}
		for i, err := range blobstore.PutBatch(ctx, s.cas, put) {
			if err != nil {
				return fmt.Errorf("directory %s: %w", put[i].Digest, err)
			}
		}
	}
	return nil
}

func digestsOf(bs []blobstore.Blob) []digest.Digest {
	ds := make([]digest.Digest, len(bs))
	for i, b := range bs {
		ds[i] = b.Digest
	}
	return ds
}

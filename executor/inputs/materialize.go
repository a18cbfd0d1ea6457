package inputs

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sync/singleflight"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
)

const (
	// maxDirectorySize bounds the encoded size of one Directory message.
	maxDirectorySize = 64 << 20
	// treeParallelism is the number of Directory messages fetched at once;
	// fetching waits on the network, not on the local disk.
	treeParallelism = 16
	// maxEntries bounds the files, directories and symlinks of an input
	// root. A Merkle tree shares subtrees, so a few small Directory
	// messages can describe a tree with billions of paths.
	maxEntries = 1 << 22
	// defaultParallelism is the default number of goroutines creating
	// directories and linking files: linking with 4 is about 2.5 times as
	// fast as with 1 on ext4.
	defaultParallelism = 4
)

// Materializer creates input roots in host directories. It links files
// through a Cache and keeps the decoded Directory messages of recent input
// roots in memory, because consecutive actions share most of their tree.
// A Materializer is safe for concurrent use.
type Materializer struct {
	cache   *Cache
	fetches singleflight.Group

	mu      sync.Mutex
	maxSize int64
	size    int64
	dirs    map[digest.Digest]*list.Element // of *directory
	lru     list.List                       // front is most recently used
}

// MaterializeOptions configures one Materialize call.
type MaterializeOptions struct {
	// Parallelism is the number of goroutines creating directories and
	// linking files; 0 means 4.
	Parallelism int
	// Place, if set, is asked how to create each regular file of the
	// tree: rel is its slash-separated path relative to the root, d and
	// executable its contents. nil keeps the default, a hardlink into the
	// cache (read-only, root's, shared). Layers do not ask it about the
	// entries of their split directory.
	Place func(rel string, d digest.Digest, executable bool) *Placement
}

// Placement is how to create a file that must not be a hardlink into the
// cache: one whose mode or owner differ from the cache's, or that its
// owner may change.
type Placement struct {
	// LinkTo, if set, is a host file with the same contents to hardlink
	// instead, which the caller keeps unchanged. If it cannot be linked,
	// the file is a copy as below.
	LinkTo string
	// Mode, UID and GID are those of a private copy of the file: a new
	// inode, the action's alone.
	Mode     fs.FileMode
	UID, GID int
}

// MaterializeStats describes one Materialize call.
type MaterializeStats struct {
	// Directories, Files and Symlinks count what was created below the
	// destination; Directories includes existing ones merged into.
	Directories, Files, Symlinks int64
	// Bytes is the total size of the files.
	Bytes int64
	// FilesFetched counts files fetched from the CAS into the cache (or
	// whose concurrent fetch was waited for); FilesCached counts the
	// others, found in the cache.
	FilesFetched, FilesCached int64
	// DirectoriesFetched counts Directory messages fetched from the CAS
	// rather than found in memory.
	DirectoriesFetched int64
	// TreeDuration is the time spent fetching the Directory messages.
	TreeDuration time.Duration
}

// NewMaterializer returns a Materializer that links files through cache
// and fetches Directory messages from the CAS of cache. It keeps decoded
// Directory messages whose encoded sizes total up to maxTreeCacheSize
// bytes (decoded, they take a few times as much memory).
func NewMaterializer(cache *Cache, maxTreeCacheSize int64) *Materializer {
	return &Materializer{cache: cache, maxSize: maxTreeCacheSize, dirs: make(map[digest.Digest]*list.Element)}
}

// directory is a decoded and validated Directory message.
type directory struct {
	d        digest.Digest
	files    []fileNode
	dirs     []dirNode
	symlinks []symlinkNode
}

type fileNode struct {
	name       string
	d          digest.Digest
	executable bool
}

type dirNode struct {
	name string
	d    digest.Digest
}

type symlinkNode struct {
	name, target string
}

// Materialize creates the input root with digest root in the existing
// directory dst: directories (mode 0755), files (hardlinks to the cache,
// read-only, see Cache.Link) and symlinks (with their targets verbatim,
// which are never followed). Directories already in dst, such as
// mountpoints created by the sandbox, are merged into; any other existing
// file at a path of the tree is an error. Child digests use the digest
// function of root.
//
// The names and structure of every Directory are validated, and the size
// of the tree is checked, before anything is created: an invalid input
// root, or one of more than 4Mi entries (files, directories and symlinks,
// a shared subtree counted once for each of its paths), yields an
// INVALID_ARGUMENT error. Blobs missing from the CAS yield a
// *MissingBlobsError listing them all; blobs the CAS serves corrupt, a
// DATA_LOSS error. On any error dst may hold part of
// the tree; the caller removes it.
func (m *Materializer) Materialize(ctx context.Context, root digest.Digest, dst string, opts MaterializeOptions) (MaterializeStats, error) {
	stats, _, err := m.materialize(ctx, root, dst, opts, "")
	return stats, err
}

// materialize is Materialize, except that if split names a directory of
// the tree (a clean relative path such as "nix/store"), that directory is
// created empty and its Directory is returned: its entries are left to the
// caller (see Layers).
func (m *Materializer) materialize(ctx context.Context, root digest.Digest, dst string, opts MaterializeOptions, split string) (MaterializeStats, *directory, error) {
	var stats MaterializeStats
	dst = filepath.Clean(dst)
	workers := opts.Parallelism
	if workers <= 0 {
		workers = defaultParallelism
	}
	if fi, err := os.Lstat(dst); err != nil {
		return stats, nil, fmt.Errorf("input root: %w", err)
	} else if !fi.IsDir() {
		return stats, nil, fmt.Errorf("input root: %s is not a directory", dst)
	}

	start := time.Now()
	tree, splitDir, err := m.fetchTree(ctx, root, split, &stats)
	stats.TreeDuration = time.Since(start)
	if err != nil {
		return stats, nil, err
	}
	if n := countEntries(tree, root, make(map[digest.Digest]int64)); n > maxEntries {
		return stats, nil, status.Errorf(codes.InvalidArgument, "input root %s has more than %d entries", root, maxEntries)
	}

	skip := ""
	if splitDir != nil {
		skip = dst + "/" + split
	}
	files, err := createDirectories(ctx, workers, tree, root, dst, skip, &stats)
	if err != nil {
		return stats, nil, err
	}

	var fetched, cached atomic.Int64
	var missing missingSet
	err = forEach(ctx, workers, len(files), func(ctx context.Context, i int) error {
		f := files[i]
		path := f.dir + "/" + f.node.name
		var miss bool
		var err error
		if pl := placement(opts, dst, path, f.node); pl != nil {
			miss, err = m.cache.placeAs(ctx, f.node.d, f.node.executable, path, pl)
		} else {
			miss, err = m.cache.link(ctx, f.node.d, f.node.executable, path)
		}
		if blobstore.IsNotFound(err) {
			missing.add(f.node.d, rel(dst, path))
			return nil
		}
		if err != nil {
			return fmt.Errorf("input %s: %w", rel(dst, path), err)
		}
		if miss {
			fetched.Add(1)
		} else {
			cached.Add(1)
		}
		return nil
	})
	stats.FilesFetched, stats.FilesCached = fetched.Load(), cached.Load()
	if err != nil {
		return stats, nil, err
	}
	return stats, splitDir, missing.err()
}

// fetchTree returns the Directory messages of the tree root, by digest.
// It fetches them level by level, each level in parallel. The entries of
// the directory at path split are not descended into (unless the same
// Directory also appears elsewhere); that Directory is returned, or nil if
// the tree has no directory at split.
func (m *Materializer) fetchTree(ctx context.Context, root digest.Digest, split string, stats *MaterializeStats) (map[digest.Digest]*directory, *directory, error) {
	type item struct {
		d      digest.Digest
		path   string
		expand bool
	}
	tree := make(map[digest.Digest]*directory)
	expanded := map[digest.Digest]bool{root: true}
	queued := map[digest.Digest]bool{root: true}
	level := []item{{root, ".", true}}
	var splitD digest.Digest
	var hasSplit bool
	var fetched atomic.Int64
	defer func() { stats.DirectoriesFetched = fetched.Load() }()
	for len(level) > 0 {
		dirs := make([]*directory, len(level))
		var missing missingSet
		err := forEach(ctx, treeParallelism, len(level), func(ctx context.Context, i int) error {
			dir, wasFetched, err := m.directory(ctx, level[i].d)
			if blobstore.IsNotFound(err) {
				missing.add(level[i].d, level[i].path)
				return nil
			}
			if err != nil {
				return fmt.Errorf("input directory %s: %w", level[i].path, err)
			}
			if wasFetched {
				fetched.Add(1)
			}
			dirs[i] = dir
			return nil
		})
		if err != nil {
			return nil, nil, err
		}
		if err := missing.err(); err != nil {
			return nil, nil, err
		}
		var next []item
		for i, dir := range dirs {
			it := level[i]
			tree[it.d] = dir
			if !it.expand {
				continue
			}
			for _, sub := range dir.dirs {
				p := join(it.path, sub.name)
				if p == split {
					splitD, hasSplit = sub.d, true
					if !queued[sub.d] {
						queued[sub.d] = true
						next = append(next, item{sub.d, p, false})
					}
					continue
				}
				if !expanded[sub.d] {
					expanded[sub.d], queued[sub.d] = true, true
					next = append(next, item{sub.d, p, true})
				}
			}
		}
		level = next
	}
	if !hasSplit {
		return tree, nil, nil
	}
	return tree, tree[splitD], nil
}

// countEntries returns the number of entries below the directory d of
// tree, counting shared subtrees once for each path to them, or
// maxEntries+1 if there are more than maxEntries. memo holds the counts of
// the directories visited.
func countEntries(tree map[digest.Digest]*directory, d digest.Digest, memo map[digest.Digest]int64) int64 {
	if n, ok := memo[d]; ok {
		return n
	}
	dir := tree[d]
	if dir == nil {
		return 0 // below a split directory: not part of this tree
	}
	n := int64(len(dir.files) + len(dir.dirs) + len(dir.symlinks))
	for _, sub := range dir.dirs {
		if n += countEntries(tree, sub.d, memo); n > maxEntries {
			n = maxEntries + 1
			break
		}
	}
	memo[d] = n
	return n
}

// fileJob is a file to link into the directory dir.
type fileJob struct {
	dir  string
	node *fileNode
}

// createDirectories creates the directories and symlinks of tree below
// dst, level by level, and returns the files to link. The entries of the
// directory skip (a path below dst) are left out.
func createDirectories(ctx context.Context, workers int, tree map[digest.Digest]*directory, root digest.Digest, dst, skip string, stats *MaterializeStats) ([]fileJob, error) {
	type dirJob struct {
		path string
		dir  *directory
	}
	var files []fileJob
	level := []dirJob{{path: dst, dir: tree[root]}}
	for len(level) > 0 {
		level = slices.DeleteFunc(level, func(j dirJob) bool { return j.path == skip })
		for _, job := range level {
			for i := range job.dir.files {
				f := &job.dir.files[i]
				files = append(files, fileJob{dir: job.path, node: f})
				stats.Bytes += f.d.Size()
			}
			stats.Files += int64(len(job.dir.files))
			stats.Symlinks += int64(len(job.dir.symlinks))
			stats.Directories += int64(len(job.dir.dirs))
		}
		next := make([][]dirJob, len(level))
		err := forEach(ctx, workers, len(level), func(ctx context.Context, i int) error {
			job := level[i]
			for _, s := range job.dir.symlinks {
				path := job.path + "/" + s.name
				if err := os.Symlink(s.target, path); err != nil {
					return fmt.Errorf("input %s: %w", rel(dst, path), err)
				}
			}
			for _, sub := range job.dir.dirs {
				path := job.path + "/" + sub.name
				if err := mkdir(path); err != nil {
					return fmt.Errorf("input %s: %w", rel(dst, path), err)
				}
				next[i] = append(next[i], dirJob{path: path, dir: tree[sub.d]})
			}
			return nil
		})
		if err != nil {
			return nil, err
		}
		level = slices.Concat(next...)
	}
	return files, nil
}

// mkdir creates the directory path with mode 0755, or accepts an existing
// directory (not a symlink to one).
func mkdir(path string) error {
	err := os.Mkdir(path, 0o755)
	if err == nil {
		return os.Chmod(path, 0o755) // not subject to the umask
	}
	if errors.Is(err, fs.ErrExist) {
		if fi, lerr := os.Lstat(path); lerr == nil && fi.IsDir() {
			return nil
		}
		return fmt.Errorf("%s exists and is not a directory", path)
	}
	return err
}

// leaderCanceled is the error of a shared fetch whose leading caller's
// context ended; the other callers try again.
type leaderCanceled struct{ error }

func (e leaderCanceled) Unwrap() error { return e.error }

// directory returns the Directory with digest d, from memory or from the
// CAS; concurrent calls for the same digest fetch it once.
func (m *Materializer) directory(ctx context.Context, d digest.Digest) (dir *directory, fetched bool, err error) {
	for {
		if dir := m.cached(d); dir != nil {
			return dir, false, nil
		}
		ch := m.fetches.DoChan(d.String(), func() (any, error) {
			if dir := m.cached(d); dir != nil {
				return dir, nil // fetched by a call that just ended
			}
			dir, err := m.readDirectory(ctx, d)
			if err != nil {
				if ctx.Err() != nil {
					return nil, leaderCanceled{err}
				}
				return nil, err
			}
			m.add(dir)
			return dir, nil
		})
		select {
		case <-ctx.Done():
			return nil, false, ctx.Err()
		case r := <-ch:
			if r.Err == nil {
				return r.Val.(*directory), true, nil
			}
			if errors.As(r.Err, new(leaderCanceled)) && ctx.Err() == nil {
				continue
			}
			return nil, false, r.Err
		}
	}
}

func (m *Materializer) readDirectory(ctx context.Context, d digest.Digest) (*directory, error) {
	if d == digest.Empty(d.Function()) {
		// The empty Directory; REAPI clients need not upload the empty blob.
		return &directory{d: d}, nil
	}
	data, err := blobstore.GetBytes(ctx, m.cache.cas, d, maxDirectorySize)
	if err != nil {
		return nil, err
	}
	// A CAS backend verifies what it serves; check again before trusting
	// the message for as long as it stays in memory.
	if err := d.Verify(data); err != nil {
		return nil, corruptError(err)
	}
	return parseDirectory(d, data)
}

// parseDirectory decodes and validates the Directory message data, whose
// digest is d.
func parseDirectory(d digest.Digest, data []byte) (*directory, error) {
	var pb repb.Directory
	if err := proto.Unmarshal(data, &pb); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "directory %s: %v", d, err)
	}
	dir := &directory{
		d:        d,
		files:    make([]fileNode, 0, len(pb.Files)),
		dirs:     make([]dirNode, 0, len(pb.Directories)),
		symlinks: make([]symlinkNode, 0, len(pb.Symlinks)),
	}
	names := make(map[string]struct{}, len(pb.Files)+len(pb.Directories)+len(pb.Symlinks))
	invalid := func(format string, args ...any) error {
		return status.Errorf(codes.InvalidArgument, "directory %s: %s", d, fmt.Sprintf(format, args...))
	}
	checkName := func(name string) error {
		if err := validName(name); err != nil {
			return invalid("%v", err)
		}
		if _, dup := names[name]; dup {
			return invalid("name %q appears more than once", name)
		}
		names[name] = struct{}{}
		return nil
	}
	for _, f := range pb.Files {
		if err := checkName(f.GetName()); err != nil {
			return nil, err
		}
		fd, err := digest.FromProto(d.Function(), f.GetDigest())
		if err != nil {
			return nil, invalid("file %q: %v", f.GetName(), err)
		}
		dir.files = append(dir.files, fileNode{name: f.GetName(), d: fd, executable: f.GetIsExecutable()})
	}
	for _, s := range pb.Directories {
		if err := checkName(s.GetName()); err != nil {
			return nil, err
		}
		sd, err := digest.FromProto(d.Function(), s.GetDigest())
		if err != nil {
			return nil, invalid("directory %q: %v", s.GetName(), err)
		}
		dir.dirs = append(dir.dirs, dirNode{name: s.GetName(), d: sd})
	}
	for _, l := range pb.Symlinks {
		if err := checkName(l.GetName()); err != nil {
			return nil, err
		}
		if l.GetTarget() == "" || strings.IndexByte(l.GetTarget(), 0) >= 0 {
			return nil, invalid("symlink %q has an invalid target %q", l.GetName(), l.GetTarget())
		}
		dir.symlinks = append(dir.symlinks, symlinkNode{name: l.GetName(), target: l.GetTarget()})
	}
	return dir, nil
}

// validName reports whether name can be used as one path component.
func validName(name string) error {
	switch {
	case name == "":
		return errors.New("empty name")
	case name == "." || name == "..":
		return fmt.Errorf("name %q is not allowed", name)
	case strings.ContainsAny(name, "/\x00"):
		return fmt.Errorf("name %q contains a slash or NUL", name)
	}
	return nil
}

// cached returns the Directory with digest d if it is in memory.
func (m *Materializer) cached(d digest.Digest) *directory {
	m.mu.Lock()
	defer m.mu.Unlock()
	if el := m.dirs[d]; el != nil {
		m.lru.MoveToFront(el)
		return el.Value.(*directory)
	}
	return nil
}

// add keeps dir in memory, accounted by its encoded size.
func (m *Materializer) add(dir *directory) {
	size := dir.d.Size()
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.dirs[dir.d]; ok || size > m.maxSize {
		return
	}
	m.dirs[dir.d] = m.lru.PushFront(dir)
	m.size += size
	for m.size > m.maxSize {
		old := m.lru.Remove(m.lru.Back()).(*directory)
		delete(m.dirs, old.d)
		m.size -= old.d.Size()
	}
}

// MissingBlobsError reports blobs of an input root that the CAS does not
// hold. Its gRPC status (status.Convert, status.Code) is FAILED_PRECONDITION
// with a PreconditionFailure detail holding a MISSING violation for each
// blob, subject "blobs/{digest_function/}{hash}/{size}", which is what REAPI
// asks an Execute response to carry for missing inputs.
type MissingBlobsError struct {
	// Digests lists each missing blob once.
	Digests []digest.Digest
	// Paths holds, for each digest, one path in the input root where it
	// is used ("." for the root directory).
	Paths []string
}

// Error lists the missing blobs with their paths.
func (e *MissingBlobsError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "input root: %d blob(s) missing from the CAS:", len(e.Digests))
	const show = 10
	for i, d := range e.Digests[:min(len(e.Digests), show)] {
		fmt.Fprintf(&b, " %s (%s)", d, e.Paths[i])
	}
	if len(e.Digests) > show {
		fmt.Fprintf(&b, " and %d more", len(e.Digests)-show)
	}
	return b.String()
}

// GRPCStatus returns the FAILED_PRECONDITION status REAPI prescribes.
func (e *MissingBlobsError) GRPCStatus() *status.Status {
	st := status.New(codes.FailedPrecondition, e.Error())
	pf := &errdetails.PreconditionFailure{}
	for _, d := range e.Digests {
		pf.Violations = append(pf.Violations, &errdetails.PreconditionFailure_Violation{
			Type:    "MISSING",
			Subject: "blobs/" + d.String(),
		})
	}
	if withDetails, err := st.WithDetails(pf); err == nil {
		st = withDetails
	}
	return st
}

// missingSet collects missing blobs from concurrent goroutines.
type missingSet struct {
	mu    sync.Mutex
	ds    []digest.Digest
	paths []string
}

func (s *missingSet) add(d digest.Digest, path string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !slices.Contains(s.ds, d) {
		s.ds = append(s.ds, d)
		s.paths = append(s.paths, path)
	}
}

// err returns a *MissingBlobsError sorted by path, or nil.
func (s *missingSet) err() error {
	if len(s.ds) == 0 {
		return nil
	}
	e := &MissingBlobsError{}
	order := make([]int, len(s.ds))
	for i := range order {
		order[i] = i
	}
	slices.SortFunc(order, func(a, b int) int { return strings.Compare(s.paths[a], s.paths[b]) })
	e.Digests, e.Paths = make([]digest.Digest, len(order)), make([]string, len(order))
	for i, j := range order {
		e.Digests[i], e.Paths[i] = s.ds[j], s.paths[j]
	}
	return e
}

// forEach calls f(ctx, i) for each i in [0, n) on up to workers
// goroutines. It stops at the first error, which it returns, and when ctx
// ends.
func forEach(ctx context.Context, workers, n int, f func(ctx context.Context, i int) error) error {
	workers = min(workers, n)
	if workers <= 1 {
		for i := range n {
			if err := ctx.Err(); err != nil {
				return err
			}
			if err := f(ctx, i); err != nil {
				return err
			}
		}
		return nil
	}
	g, ctx := errgroup.WithContext(ctx)
	var next atomic.Int64
	for range workers {
		g.Go(func() error {
			for {
				if err := ctx.Err(); err != nil {
					return err
				}
				i := int(next.Add(1)) - 1
				if i >= n {
					return nil
				}
				if err := f(ctx, i); err != nil {
					return err
				}
			}
		})
	}
	return g.Wait()
}

// join joins a path relative to the input root and a name.
func join(dir, name string) string {
	if dir == "." {
		return name
	}
	return dir + "/" + name
}

// placement asks opts.Place about the file node at path.
func placement(opts MaterializeOptions, dst, path string, node *fileNode) *Placement {
	if opts.Place == nil {
		return nil
	}
	return opts.Place(rel(dst, path), node.d, node.executable)
}

// rel returns path relative to the input root dst.
func rel(dst, path string) string {
	if r, ok := strings.CutPrefix(path, dst+"/"); ok {
		return r
	}
	return path
}

// Package outputs collects the outputs of an action that has run in a
// sandbox from the host directory that was its input root, and uploads
// them to the CAS.
//
// The file system is written by the build, which is untrusted: outputs are
// resolved beneath the input root with openat2 (RESOLVE_BENEATH,
// RESOLVE_NO_SYMLINKS), symlinks are recorded as symlinks and never
// followed, and a symlink in a parent directory of an output is an error,
// as in Buildbarn, rather than a missing output. Files are read as the
// executor (root), so directories the build made unreadable are read too.
//
// Error paths are relative to the input root. Errors caused by what the
// build left behind (a FIFO, a file declared as a directory, a name that
// is not UTF-8) are FAILED_PRECONDITION status errors, invalid declared
// paths are INVALID_ARGUMENT, as REAPI's Execute reports them.
package outputs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"unicode/utf8"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
)

const (
	// smallBlobSize is the size below which blobs are uploaded with
	// blobstore.PutBatch, from memory, and above which files are streamed
	// with Put.
	smallBlobSize = 1 << 20
	// keepBudget bounds the contents of small files kept in memory
	// between hashing and uploading; files beyond it are read again.
	keepBudget = 64 << 20
	// maxDepth bounds the nesting of output directories, which costs a
	// file descriptor and a stack frame per level while it is walked.
	maxDepth = 1024
)

// Options tunes Collect. The zero value is ready to use.
type Options struct {
	// Concurrency bounds the files hashed, and the uploads, that run at
	// once. Zero means GOMAXPROCS, at most 8.
	Concurrency int
}

func (o Options) concurrency() int {
	if o.Concurrency > 0 {
		return o.Concurrency
	}
	return min(runtime.GOMAXPROCS(0), 8)
}

// Result is what Collect found and uploaded.
type Result struct {
	// ActionResult has the output_files, output_directories and
	// output_*symlinks fields set, in the order the outputs were
	// declared; its other fields (exit code, stdout, stderr, execution
	// metadata) are the caller's to set. Paths are as declared,
	// relative to the working directory.
	ActionResult *repb.ActionResult
	// Stats counts what was collected and uploaded.
	Stats Stats
}

// Stats counts the work of Collect.
type Stats struct {
	// Files is the number of regular files collected, top-level outputs
	// and files inside output directories alike (a file inside two
	// nested declared output directories counts twice).
	Files int
	// Bytes is the total size of those files.
	Bytes int64
	// UploadedBlobs counts the distinct blobs (files, Directory and Tree
	// messages) that the CAS did not have and were uploaded.
	UploadedBlobs int
	// UploadedBytes is the total size of those blobs.
	UploadedBytes int64
	// PresentBlobs counts the distinct blobs the CAS already had. The
	// empty blob is neither counted nor uploaded: servers treat it as
	// always present.
	PresentBlobs int
}

// Collect collects the outputs cmd declares from inputRoot, the host
// directory that was the input root of the action, and uploads them to cas
// under fn.
//
// The outputs are cmd's output_paths if any, else its output_files and
// output_directories (REAPI v2.0). Each is resolved with ResolvePath; an
// invalid one fails Collect before anything is read. Outputs that do not
// exist, or whose parent directory does not exist, are omitted from the
// result. A regular file becomes an OutputFile; a directory becomes an
// OutputDirectory whose Tree is topologically sorted, with identical
// subdirectories stored once; its Directory messages are uploaded too and
// root_directory_digest is set, whatever output_directory_format asks (a
// superset, as REAPI allows); a symlink becomes an OutputSymlink with its target verbatim, in
// output_symlinks for output_paths and in output_file_symlinks or
// output_directory_symlinks for the legacy fields, as REAPI v2.1
// specifies. Inside output directories, symlinks are recorded and not
// followed, and FIFOs, sockets and devices are errors.
//
// All blobs are hashed first, then looked up with one FindMissing call;
// only the missing ones are uploaded, small ones in batches and large
// files streamed from disk.
func Collect(ctx context.Context, cas blobstore.BlobAccess, fn digest.Function, inputRoot string, cmd *repb.Command, opts Options) (*Result, error) {
	if err := checkFunction(fn); err != nil {
		return nil, err
	}
	outs, err := declaredOutputs(cmd)
	if err != nil {
		return nil, err
	}
	root, err := unix.Open(inputRoot, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open input root %s: %w", inputRoot, err)
	}
	defer unix.Close(root)

	c := &collector{fn: fn, root: root}
	found, err := c.walk(ctx, outs, opts.concurrency())
	if err != nil {
		return nil, err
	}

	res := &Result{ActionResult: &repb.ActionResult{}}
	ar := res.ActionResult
	var blobs blobSet
	for _, f := range c.files {
		res.Stats.Files++
		res.Stats.Bytes += f.d.Size()
		blobs.add(blob{d: f.d, data: f.data, file: f})
	}
	for i, o := range outs {
		fo := found[i]
		switch {
		case fo.file != nil:
			ar.OutputFiles = append(ar.OutputFiles, &repb.OutputFile{Path: o.path, Digest: fo.file.d.Proto(), IsExecutable: fo.file.exec})
		case fo.dir != nil:
			c.encode(fo.dir, &blobs)
			tree := treeOf(fo.dir)
			td := digest.Compute(fn, tree)
			blobs.add(blob{d: td, data: tree})
			ar.OutputDirectories = append(ar.OutputDirectories, &repb.OutputDirectory{
				Path:                  o.path,
				TreeDigest:            td.Proto(),
				IsTopologicallySorted: true,
				RootDirectoryDigest:   fo.dir.d.Proto(),
			})
		case fo.symlink != nil:
			s := &repb.OutputSymlink{Path: o.path, Target: *fo.symlink}
			switch o.want {
			case wantAny:
				ar.OutputSymlinks = append(ar.OutputSymlinks, s)
			case wantFile:
				ar.OutputFileSymlinks = append(ar.OutputFileSymlinks, s)
			case wantDir:
				ar.OutputDirectorySymlinks = append(ar.OutputDirectorySymlinks, s)
			}
		}
	}
	if err := upload(ctx, cas, root, blobs.list, opts.concurrency(), &res.Stats); err != nil {
		return nil, err
	}
	return res, nil
}

func checkFunction(fn digest.Function) error {
	if fn != digest.SHA256 && fn != digest.BLAKE3 {
		return status.Errorf(codes.InvalidArgument, "unsupported digest function %s", fn)
	}
	return nil
}

// file is a regular file found among the outputs. Its fields other than
// rel are set by the hashing worker.
type file struct {
	rel      string // relative to the input root
	d        digest.Digest
	exec     bool
	dev, ino uint64 // to recognize the file when it is read again
	data     []byte // contents of a small file, if kept
}

// dir is a directory found among the outputs, with its entries sorted by
// name. d and data are set by encode.
type dir struct {
	files    []namedFile
	dirs     []namedDir
	symlinks []*repb.SymlinkNode
	d        digest.Digest
	data     []byte // the serialized Directory message
}

type namedFile struct {
	name string
	f    *file
}

type namedDir struct {
	name string
	d    *dir
}

// found is what a declared output turned out to be; all nil if missing.
type found struct {
	file    *file
	dir     *dir
	symlink *string
}

// hashJob is a regular file opened by the walk for a hashing worker, which
// closes fd.
type hashJob struct {
	f  *file
	fd int
}

// collector walks the outputs beneath an input root.
type collector struct {
	fn    digest.Function
	root  int
	jobs  chan hashJob
	files []*file // every file, in walk order
	kept  atomic.Int64
}

// walk walks outs on one goroutine while workers hash the files it finds.
func (c *collector) walk(ctx context.Context, outs []output, workers int) ([]found, error) {
	g, ctx := errgroup.WithContext(ctx)
	c.jobs = make(chan hashJob, 2*workers)
	for range workers {
		g.Go(func() error { return c.hashFiles(ctx) })
	}
	founds := make([]found, len(outs))
	g.Go(func() error {
		defer close(c.jobs)
		for i, o := range outs {
			fo, err := c.walkOutput(ctx, o)
			if err != nil {
				return err
			}
			founds[i] = fo
		}
		return nil
	})
	err := g.Wait()
	// Close the files that workers that stopped early did not take.
	for j := range c.jobs {
		unix.Close(j.fd)
	}
	return founds, err
}

// walkOutput looks at one declared output and walks it if it is a
// directory.
func (c *collector) walkOutput(ctx context.Context, o output) (found, error) {
	parent, name := splitRel(o.rel)
	pfd, err := openDir(c.root, parent)
	if errors.Is(err, unix.ENOENT) {
		return found{}, nil
	} else if err != nil {
		return found{}, fmt.Errorf("output %s: %w", o.rel, err)
	}
	defer unix.Close(pfd)
	st, err := lstatAt(pfd, name)
	if err == unix.ENOENT {
		return found{}, nil
	} else if err != nil {
		return found{}, fmt.Errorf("output %s: %w", o.rel, err)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		if o.want == wantDir {
			return found{}, status.Errorf(codes.FailedPrecondition, "output %s: declared as an output directory, but is a regular file", o.rel)
		}
		f, err := c.enqueue(ctx, pfd, name, o.rel)
		return found{file: f}, err
	case unix.S_IFDIR:
		if o.want == wantFile {
			return found{}, status.Errorf(codes.FailedPrecondition, "output %s: declared as an output file, but is a directory", o.rel)
		}
		d, err := c.walkDir(ctx, pfd, name, o.rel, 0)
		return found{dir: d}, err
	case unix.S_IFLNK:
		target, err := symlinkTarget(pfd, name, o.rel, st.Size)
		return found{symlink: &target}, err
	}
	return found{}, status.Errorf(codes.FailedPrecondition, "output %s: is a %s", o.rel, typeName(st.Mode))
}

// splitRel splits a cleaned relative path into its parent ("." for none)
// and its last component.
func splitRel(rel string) (parent, name string) {
	for i := len(rel) - 1; i >= 0; i-- {
		if rel[i] == '/' {
			return rel[:i], rel[i+1:]
		}
	}
	return ".", rel
}

// walkDir reads the directory name in the directory parent, rel being its
// path relative to the input root, and queues its files for hashing.
func (c *collector) walkDir(ctx context.Context, parent int, name, rel string, depth int) (*dir, error) {
	if depth >= maxDepth {
		return nil, status.Errorf(codes.FailedPrecondition, "output %s: directories are nested more than %d levels deep", rel, maxDepth)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	fd, err := unix.Openat(parent, name, dirFlags, 0)
	if err != nil {
		return nil, fmt.Errorf("output %s: %w", rel, err)
	}
	defer unix.Close(fd)
	names, err := readDirNames(fd)
	if err != nil {
		return nil, fmt.Errorf("output %s: read directory: %w", rel, err)
	}
	slices.Sort(names)
	d := &dir{}
	for _, n := range names {
		crel := rel + "/" + n
		if !utf8.ValidString(n) {
			return nil, status.Errorf(codes.FailedPrecondition, "output %q: name is not valid UTF-8", crel)
		}
		st, err := lstatAt(fd, n)
		if err == unix.ENOENT {
			continue // Removed since it was listed.
		} else if err != nil {
			return nil, fmt.Errorf("output %s: %w", crel, err)
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFREG:
			f, err := c.enqueue(ctx, fd, n, crel)
			if err != nil {
				return nil, err
			}
			d.files = append(d.files, namedFile{n, f})
		case unix.S_IFDIR:
			sub, err := c.walkDir(ctx, fd, n, crel, depth+1)
			if err != nil {
				return nil, err
			}
			d.dirs = append(d.dirs, namedDir{n, sub})
		case unix.S_IFLNK:
			target, err := symlinkTarget(fd, n, crel, st.Size)
			if err != nil {
				return nil, err
			}
			d.symlinks = append(d.symlinks, &repb.SymlinkNode{Name: n, Target: target})
		default:
			return nil, status.Errorf(codes.FailedPrecondition, "output %s: is a %s; output directories may hold only regular files, directories and symlinks", crel, typeName(st.Mode))
		}
	}
	return d, nil
}

// symlinkTarget reads the target of the symlink name in dir.
func symlinkTarget(dir int, name, rel string, size int64) (string, error) {
	target, err := readlinkAt(dir, name, size)
	if err != nil {
		return "", fmt.Errorf("output %s: readlink: %w", rel, err)
	}
	if !utf8.ValidString(target) {
		return "", status.Errorf(codes.FailedPrecondition, "output %s: symlink target %q is not valid UTF-8", rel, target)
	}
	return target, nil
}

// enqueue opens the regular file name in dir and hands it to a hashing
// worker.
func (c *collector) enqueue(ctx context.Context, dir int, name, rel string) (*file, error) {
	fd, st, err := openFileAt(dir, name)
	if err != nil {
		return nil, fmt.Errorf("output %s: %w", rel, err)
	}
	f := &file{rel: rel, exec: st.Mode&0o100 != 0, dev: st.Dev, ino: st.Ino}
	select {
	case c.jobs <- hashJob{f: f, fd: fd}:
		c.files = append(c.files, f)
		return f, nil
	case <-ctx.Done():
		unix.Close(fd)
		return nil, ctx.Err()
	}
}

// hashFiles is a hashing worker.
func (c *collector) hashFiles(ctx context.Context) error {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	for j := range c.jobs {
		err := ctx.Err()
		if err == nil {
			var data []byte
			j.f.d, data, err = hashFD(ctx, c.fn, j.fd, *bp)
			if data != nil && c.kept.Add(int64(len(data))) <= keepBudget {
				j.f.data = bytes.Clone(data)
			}
		}
		unix.Close(j.fd)
		if err != nil {
			return fmt.Errorf("output %s: %w", j.f.rel, err)
		}
	}
	return nil
}

// bufPool holds read buffers of smallBlobSize bytes.
var bufPool = sync.Pool{New: func() any {
	b := make([]byte, smallBlobSize)
	return &b
}}

// hashFD hashes the file fd from its current offset to its end, reading
// through buf. If the file is smaller than buf, its contents are returned
// as well, in buf.
func hashFD(ctx context.Context, fn digest.Function, fd int, buf []byte) (digest.Digest, []byte, error) {
	r := fdReader{fd}
	n, err := readFull(r, buf)
	if err != nil {
		return digest.Digest{}, nil, err
	}
	if n < len(buf) {
		return digest.Compute(fn, buf[:n]), buf[:n], nil
	}
	h := fn.New()
	size := int64(n)
	for n > 0 {
		h.Write(buf[:n])
		if err := ctx.Err(); err != nil {
			return digest.Digest{}, nil, err
		}
		if n, err = readFull(r, buf); err != nil {
			return digest.Digest{}, nil, err
		}
		size += int64(n)
	}
	var sum [digest.HashSize]byte
	h.Sum(sum[:0])
	return digest.New(fn, sum, size), nil, nil
}

// readFull reads into buf until it is full or the file ends.
func readFull(r fdReader, buf []byte) (int, error) {
	n := 0
	for n < len(buf) {
		m, err := r.Read(buf[n:])
		n += m
		if err != nil {
			if err == io.EOF {
				break
			}
			return n, err
		}
	}
	return n, nil
}

// encode serializes d and its subdirectories, sets their digests and adds
// them to blobs.
func (c *collector) encode(d *dir, blobs *blobSet) {
	pd := &repb.Directory{
		Files:       make([]*repb.FileNode, len(d.files)),
		Directories: make([]*repb.DirectoryNode, len(d.dirs)),
		Symlinks:    d.symlinks,
	}
	for i, f := range d.files {
		pd.Files[i] = &repb.FileNode{Name: f.name, Digest: f.f.d.Proto(), IsExecutable: f.f.exec}
	}
	for i, s := range d.dirs {
		c.encode(s.d, blobs)
		pd.Directories[i] = &repb.DirectoryNode{Name: s.name, Digest: s.d.d.Proto()}
	}
	data, err := proto.MarshalOptions{Deterministic: true}.Marshal(pd)
	if err != nil {
		// Only invalid UTF-8 makes marshaling fail, and walkDir
		// rejected it.
		panic(fmt.Sprintf("outputs: marshal Directory: %v", err))
	}
	d.data = data
	d.d = digest.Compute(c.fn, data)
	blobs.add(blob{d: d.d, data: data})
}

// treeOf returns the serialized Tree of the encoded directory root. Each
// distinct directory is stored once, and after every directory that
// contains it (Kahn's algorithm, taking children in name order), so the
// root comes first. The Tree is built from the Directory messages as
// serialized for their digests, as REAPI recommends for topologically
// sorted trees; the result equals the deterministic encoding of the Tree.
func treeOf(root *dir) []byte {
	// Count the references to each distinct directory from distinct
	// directories.
	refs := make(map[digest.Digest]int)
	seen := map[digest.Digest]bool{root.d: true}
	stack := []*dir{root}
	for len(stack) > 0 {
		d := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		for _, s := range d.dirs {
			refs[s.d.d]++
			if !seen[s.d.d] {
				seen[s.d.d] = true
				stack = append(stack, s.d)
			}
		}
	}
	b := protowire.AppendTag(nil, 1, protowire.BytesType)
	b = protowire.AppendBytes(b, root.data)
	for queue := []*dir{root}; len(queue) > 0; queue = queue[1:] {
		for _, s := range queue[0].dirs {
			if refs[s.d.d]--; refs[s.d.d] == 0 {
				b = protowire.AppendTag(b, 2, protowire.BytesType)
				b = protowire.AppendBytes(b, s.d.data)
				queue = append(queue, s.d)
			}
		}
	}
	return b
}

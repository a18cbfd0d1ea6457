package nar

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"unicode/utf8"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"tvixfarm/cas/digest"
)

// readSize is the size of the buffer local files are read through.
const readSize = 1 << 20

// Dump writes the NAR serialisation of the file, directory or symlink at
// path on the local file system to w, as `nix-store --dump` does: a
// symlink at path is not followed, entries are sorted by the raw bytes of
// their names, and a file is executable iff its owner execute bit is set.
// Names and targets need not be UTF-8. Sockets, FIFOs and devices are
// errors.
func Dump(path string, w io.Writer) error {
	return DumpContext(context.Background(), path, w)
}

// DumpContext is Dump, stopped when ctx is done.
func DumpContext(ctx context.Context, path string, w io.Writer) error {
	fw := &fsWalker{ctx: ctx, nw: newNarWriter(w)}
	defer fw.nw.release()
	fw.nw.raw(tokMagic)
	if _, err := fw.walk(unix.AT_FDCWD, filepath.Clean(path), filepath.Clean(path), 0); err != nil {
		return err
	}
	return fw.nw.flush()
}

// fsWalker serialises a local tree as a NAR and, for Ingest, also builds
// its REAPI Node and blobs.
type fsWalker struct {
	ctx context.Context
	nw  *narWriter
	buf []byte
	ing *ingester // nil for Dump
}

// walk serialises name in the directory dirfd, at path, and returns its
// Node if ingesting.
func (w *fsWalker) walk(dirfd int, name, path string, depth int) (Node, error) {
	var st unix.Stat_t
	if err := unix.Fstatat(dirfd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return Node{}, fmt.Errorf("nar: lstat %q: %w", path, err)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		return w.file(dirfd, name, path)
	case unix.S_IFDIR:
		return w.dir(dirfd, name, path, depth)
	case unix.S_IFLNK:
		target, err := readlinkat(dirfd, name, st.Size)
		if err != nil {
			return Node{}, fmt.Errorf("nar: readlink %q: %w", path, err)
		}
		if w.ing != nil && !utf8.ValidString(target) {
			return Node{}, fmt.Errorf("nar: symlink %q: target %q is not valid UTF-8, which REAPI cannot represent", path, target)
		}
		w.nw.raw(tokSymlink)
		w.nw.str(target)
		w.nw.raw(tokClose)
		return SymlinkNode(target), w.nw.err
	}
	return Node{}, fmt.Errorf("nar: %q: unsupported file type (mode %#o)", path, st.Mode)
}

func (w *fsWalker) dir(dirfd int, name, path string, depth int) (Node, error) {
	if depth > maxDepth {
		return Node{}, fmt.Errorf("nar: %q: directories nested more than %d deep", path, maxDepth)
	}
	if err := w.ctx.Err(); err != nil {
		return Node{}, err
	}
	fd, err := unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return Node{}, fmt.Errorf("nar: open directory %q: %w", path, err)
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	names, err := f.Readdirnames(-1)
	if err != nil {
		return Node{}, fmt.Errorf("nar: read directory %q: %w", path, err)
	}
	slices.Sort(names)
	var pd *repb.Directory
	if w.ing != nil {
		pd = &repb.Directory{}
		for _, n := range names {
			if !utf8.ValidString(n) {
				return Node{}, fmt.Errorf("nar: %q: name is not valid UTF-8, which REAPI cannot represent", path+"/"+n)
			}
		}
	}
	w.nw.raw(tokDirectory)
	for _, n := range names {
		w.nw.raw(tokEntry)
		w.nw.str(n)
		w.nw.raw(tokNode)
		c, err := w.walk(fd, n, path+"/"+n, depth+1)
		if err != nil {
			return Node{}, err
		}
		w.nw.raw(tokClose)
		if pd != nil {
			switch c.Type {
			case Regular:
				pd.Files = append(pd.Files, &repb.FileNode{Name: n, Digest: c.Digest.Proto(), IsExecutable: c.Executable})
			case Directory:
				pd.Directories = append(pd.Directories, &repb.DirectoryNode{Name: n, Digest: c.Digest.Proto()})
			case Symlink:
				pd.Symlinks = append(pd.Symlinks, &repb.SymlinkNode{Name: n, Target: c.Target})
			}
		}
	}
	w.nw.raw(tokClose)
	if w.nw.err != nil {
		return Node{}, w.nw.err
	}
	if pd == nil {
		return Node{}, nil
	}
	data, err := proto.MarshalOptions{Deterministic: true}.Marshal(pd)
	if err != nil {
		return Node{}, fmt.Errorf("nar: %q: marshal directory: %w", path, err)
	}
	d := digest.Compute(w.ing.fn, data)
	w.ing.add(Blob{Digest: d, Data: data})
	return DirectoryNode(d), nil
}

// file serialises the regular file name in dirfd and, when ingesting,
// computes its digest in the same read.
func (w *fsWalker) file(dirfd int, name, path string) (Node, error) {
	fd, err := unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return Node{}, fmt.Errorf("nar: open %q: %w", path, err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return Node{}, fmt.Errorf("nar: stat %q: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return Node{}, fmt.Errorf("nar: %q: replaced while read", path)
	}
	exec, size := st.Mode&0o100 != 0, st.Size
	if w.buf == nil {
		w.buf = make([]byte, readSize)
	}
	w.nw.regular(exec, uint64(size))
	var h interface{ Write([]byte) (int, error) }
	var hh interface{ Sum([]byte) []byte }
	if w.ing != nil && size > int64(len(w.buf)) {
		x := w.ing.fn.New()
		h, hh = x, x
	}
	var small []byte
	for left := size; left > 0; {
		if err := w.ctx.Err(); err != nil {
			return Node{}, err
		}
		chunk := w.buf[:min(left, int64(len(w.buf)))]
		if _, err := io.ReadFull(fdReader(fd), chunk); err != nil {
			if err == io.ErrUnexpectedEOF || err == io.EOF {
				return Node{}, fmt.Errorf("nar: %q: file shrank while read (expected %d bytes)", path, size)
			}
			return Node{}, fmt.Errorf("nar: read %q: %w", path, err)
		}
		left -= int64(len(chunk))
		if h != nil {
			h.Write(chunk)
		} else {
			small = chunk
		}
		w.nw.raw(chunk)
	}
	w.nw.endRegular(uint64(size))
	if w.nw.err != nil {
		return Node{}, w.nw.err
	}
	if w.ing == nil {
		return Node{}, nil
	}
	var d digest.Digest
	if hh != nil {
		var sum [digest.HashSize]byte
		hh.Sum(sum[:0])
		d = digest.New(w.ing.fn, sum, size)
	} else {
		d = digest.Compute(w.ing.fn, small)
	}
	w.ing.addFile(d, small, path)
	return FileNode(d, exec), nil
}

// fdReader reads a file descriptor.
type fdReader int

func (r fdReader) Read(p []byte) (int, error) {
	for {
		n, err := unix.Read(int(r), p)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return 0, err
		}
		if n == 0 && len(p) > 0 {
			return 0, io.EOF
		}
		return n, nil
	}
}

// readlinkat reads the target of the symlink name in dirfd, whose lstat
// size is size.
func readlinkat(dirfd int, name string, size int64) (string, error) {
	n := max(int(size)+1, 256)
	for {
		buf := make([]byte, n)
		m, err := unix.Readlinkat(dirfd, name, buf)
		if err != nil {
			return "", err
		}
		if m < n {
			return string(buf[:m]), nil
		}
		n *= 2
	}
}

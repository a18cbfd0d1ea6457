package outputs

import (
	"errors"
	"fmt"
	"io"
	"path"
	"strings"
	"sync/atomic"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// The file system is the build's, and the build is hostile: every path is
// opened relative to a directory descriptor, no symlink is ever followed,
// and nothing is opened that could block (a FIFO swapped in for a file).

const (
	// dirFlags opens a directory to read it or to open entries beneath it.
	dirFlags = unix.O_RDONLY | unix.O_DIRECTORY | unix.O_NOFOLLOW | unix.O_CLOEXEC
	// fileFlags opens a regular file to read it. O_NONBLOCK makes opening
	// a FIFO return at once; it does not change reads of regular files.
	fileFlags = unix.O_RDONLY | unix.O_NOFOLLOW | unix.O_NONBLOCK | unix.O_CLOEXEC | unix.O_NOATIME
	// resolveFlags makes openat2 refuse symlinks, magic links and "..".
	resolveFlags = unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS
)

// noOpenat2 is set once openat2 turned out to be missing (Linux < 5.6);
// tests set it to exercise the component-by-component walk.
var noOpenat2 atomic.Bool

// openDir opens the directory rel, a cleaned path relative to the
// directory root without ".." components ("." is root itself), refusing
// symlinks in any of its components. A missing component yields an error
// that wraps unix.ENOENT; a symlink or non-directory component yields a
// FAILED_PRECONDITION error naming it.
func openDir(root int, rel string) (int, error) {
	if rel != "." && !noOpenat2.Load() {
		fd, err := unix.Openat2(root, rel, &unix.OpenHow{Flags: dirFlags, Resolve: resolveFlags})
		switch {
		case err == nil:
			return fd, nil
		case err == unix.ENOENT:
			return -1, fmt.Errorf("%s: %w", rel, err)
		case err == unix.ENOSYS:
			noOpenat2.Store(true)
		}
		// Any other error (ELOOP for a symlink, ENOTDIR, EPERM from a
		// seccomp filter, EAGAIN from a concurrent rename) is diagnosed,
		// or worked around, by the walk.
	}
	return walkDir(root, rel)
}

// walkDir is openDir one component at a time, for kernels without openat2
// and for precise errors.
func walkDir(root int, rel string) (int, error) {
	fd, err := unix.Openat(root, ".", dirFlags, 0)
	if err != nil {
		return -1, fmt.Errorf("open input root: %w", err)
	}
	if rel == "." {
		return fd, nil
	}
	for i, done := 0, false; !done; {
		j := strings.IndexByte(rel[i:], '/')
		if j < 0 {
			j, done = len(rel), true
		} else {
			j += i
		}
		name, prefix := rel[i:j], rel[:j]
		i = j + 1
		next, err := unix.Openat(fd, name, dirFlags, 0)
		if err != nil {
			var st unix.Stat_t
			if (err == unix.ENOTDIR || err == unix.ELOOP) && unix.Fstatat(fd, name, &st, unix.AT_SYMLINK_NOFOLLOW) == nil {
				err = status.Errorf(codes.FailedPrecondition, "%s is a %s, not a directory", prefix, typeName(st.Mode))
			} else {
				err = fmt.Errorf("%s: %w", prefix, err)
			}
		}
		unix.Close(fd)
		if err != nil {
			return -1, err
		}
		fd = next
	}
	return fd, nil
}

// lstatAt returns the status of name in dir, not following a symlink.
func lstatAt(dir int, name string) (unix.Stat_t, error) {
	var st unix.Stat_t
	err := unix.Fstatat(dir, name, &st, unix.AT_SYMLINK_NOFOLLOW)
	return st, err
}

// openFileAt opens the regular file name in dir for reading and returns
// its status. A symlink, FIFO or other non-regular file is a
// FAILED_PRECONDITION error.
func openFileAt(dir int, name string) (int, unix.Stat_t, error) {
	var st unix.Stat_t
	fd, err := unix.Openat(dir, name, fileFlags, 0)
	if err == unix.EPERM {
		// O_NOATIME needs ownership or CAP_FOWNER.
		fd, err = unix.Openat(dir, name, fileFlags&^unix.O_NOATIME, 0)
	}
	if err == unix.ELOOP {
		return -1, st, status.Error(codes.FailedPrecondition, "is a symlink, not a regular file")
	} else if err != nil {
		return -1, st, err
	}
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return -1, st, err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		unix.Close(fd)
		return -1, st, status.Errorf(codes.FailedPrecondition, "is a %s, not a regular file", typeName(st.Mode))
	}
	return fd, st, nil
}

// openFile opens the regular file rel beneath root, as openDir and
// openFileAt do.
func openFile(root int, rel string) (int, unix.Stat_t, error) {
	dir, name := path.Split(rel)
	dfd, err := openDir(root, path.Clean(dir))
	if err != nil {
		return -1, unix.Stat_t{}, err
	}
	defer unix.Close(dfd)
	return openFileAt(dfd, name)
}

// readlinkAt returns the target of the symlink name in dir; size is its
// length as lstat reported it.
func readlinkAt(dir int, name string, size int64) (string, error) {
	n := max(int(size)+1, 256)
	for {
		buf := make([]byte, n)
		m, err := unix.Readlinkat(dir, name, buf)
		if err != nil {
			return "", err
		}
		if m < n {
			return string(buf[:m]), nil
		}
		if n >= 1<<20 {
			return "", errors.New("symlink target is too long")
		}
		n *= 4
	}
}

// readDirNames returns the names in the directory fd, without "." and "..".
func readDirNames(fd int) ([]string, error) {
	buf := make([]byte, 32<<10)
	var names []string
	for {
		n, err := unix.ReadDirent(fd, buf)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, err
		}
		if n <= 0 {
			return names, nil
		}
		_, _, names = unix.ParseDirent(buf[:n], -1, names)
	}
}

// fdReader reads a file descriptor it does not own.
type fdReader struct{ fd int }

func (r fdReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	for {
		n, err := unix.Read(r.fd, p)
		switch {
		case err == unix.EINTR:
			continue
		case err != nil:
			return 0, err
		case n == 0:
			return 0, io.EOF
		}
		return n, nil
	}
}

// typeName names the file type in mode for error messages.
func typeName(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFREG:
		return "regular file"
	case unix.S_IFDIR:
		return "directory"
	case unix.S_IFLNK:
		return "symlink"
	case unix.S_IFIFO:
		return "FIFO"
	case unix.S_IFSOCK:
		return "socket"
	case unix.S_IFCHR:
		return "character device"
	case unix.S_IFBLK:
		return "block device"
	}
	return fmt.Sprintf("file of type %#o", mode&unix.S_IFMT)
}

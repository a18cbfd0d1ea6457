package nar

import (
	"encoding/binary"
	"fmt"
	"io"
	"sync"
)

// token returns the NAR encoding of the strings ss, one after the other:
// each a little-endian u64 length, the bytes and zero padding to a
// multiple of 8.
func token(ss ...string) []byte {
	var b []byte
	for _, s := range ss {
		b = binary.LittleEndian.AppendUint64(b, uint64(len(s)))
		b = append(b, s...)
		b = append(b, zeros[:padding(uint64(len(s)))]...)
	}
	return b
}

// The fixed parts of a NAR, encoded once.
var (
	tokMagic      = token("nix-archive-1")
	tokRegular    = token("(", "type", "regular")
	tokExecutable = token("executable", "")
	tokContents   = token("contents")
	tokSymlink    = token("(", "type", "symlink", "target")
	tokDirectory  = token("(", "type", "directory")
	tokEntry      = token("entry", "(", "name")
	tokNode       = token("node")
	tokClose      = token(")")
)

var zeros [8]byte

// padding returns the number of zero bytes that follow n bytes of data.
func padding(n uint64) uint64 { return (8 - n%8) % 8 }

// bufSize is the size of a narWriter's buffer, and so of most writes to
// its destination.
const bufSize = 128 << 10

var bufPool = sync.Pool{New: func() any {
	b := make([]byte, 0, bufSize)
	return &b
}}

// narWriter encodes a NAR into a buffer that it writes to w when full. The
// first error sticks: later calls do nothing, and flush returns it.
type narWriter struct {
	w   io.Writer
	buf []byte
	n   uint64 // bytes passed to w
	err error
}

func newNarWriter(w io.Writer) *narWriter {
	return &narWriter{w: w, buf: (*bufPool.Get().(*[]byte))[:0]}
}

// release returns the buffer to the pool; nw must not be used after.
func (nw *narWriter) release() {
	b := nw.buf[:0]
	nw.buf = nil
	bufPool.Put(&b)
}

// flush writes the buffer to w.
func (nw *narWriter) flush() error {
	if nw.err == nil && len(nw.buf) > 0 {
		var m int
		m, nw.err = nw.w.Write(nw.buf)
		nw.n += uint64(m)
		if nw.err == nil && m < len(nw.buf) {
			nw.err = io.ErrShortWrite
		}
	}
	nw.buf = nw.buf[:0]
	return nw.err
}

// raw appends b, writing it directly to w if it is large.
func (nw *narWriter) raw(b []byte) {
	if len(nw.buf)+len(b) <= cap(nw.buf) {
		nw.buf = append(nw.buf, b...)
		return
	}
	if nw.flush() != nil {
		return
	}
	if len(b) < cap(nw.buf)/2 {
		nw.buf = append(nw.buf, b...)
		return
	}
	var m int
	m, nw.err = nw.w.Write(b)
	nw.n += uint64(m)
	if nw.err == nil && m < len(b) {
		nw.err = io.ErrShortWrite
	}
}

// str appends s as a NAR string.
func (nw *narWriter) str(s string) {
	if len(nw.buf)+len(s)+16 > cap(nw.buf) {
		nw.u64(uint64(len(s)))
		nw.raw([]byte(s))
		nw.raw(zeros[:padding(uint64(len(s)))])
		return
	}
	nw.buf = binary.LittleEndian.AppendUint64(nw.buf, uint64(len(s)))
	nw.buf = append(nw.buf, s...)
	nw.buf = append(nw.buf, zeros[:padding(uint64(len(s)))]...)
}

// u64 appends n.
func (nw *narWriter) u64(n uint64) {
	if len(nw.buf)+8 > cap(nw.buf) && nw.flush() != nil {
		return
	}
	nw.buf = binary.LittleEndian.AppendUint64(nw.buf, n)
}

// regular appends the header of a regular file of size bytes, up to its
// contents.
func (nw *narWriter) regular(executable bool, size uint64) {
	if len(nw.buf)+len(tokRegular)+len(tokExecutable)+len(tokContents)+8 > cap(nw.buf) && nw.flush() != nil {
		return
	}
	nw.buf = append(nw.buf, tokRegular...)
	if executable {
		nw.buf = append(nw.buf, tokExecutable...)
	}
	nw.buf = append(nw.buf, tokContents...)
	nw.buf = binary.LittleEndian.AppendUint64(nw.buf, size)
}

// endRegular appends the padding after size bytes of contents and closes
// the file's node.
func (nw *narWriter) endRegular(size uint64) {
	nw.raw(zeros[:padding(size)])
	nw.raw(tokClose)
}

// file appends a regular file whose contents are data.
func (nw *narWriter) file(executable bool, data []byte) {
	nw.regular(executable, uint64(len(data)))
	nw.raw(data)
	nw.endRegular(uint64(len(data)))
}

// copyN appends exactly n bytes read from r, reading them into the buffer
// (or writing them straight from r's Bytes, for in-memory readers).
func (nw *narWriter) copyN(r io.Reader, n int64) error {
	if b, ok := r.(interface{ Bytes() []byte }); ok {
		if data := b.Bytes(); int64(len(data)) == n {
			nw.raw(data)
			return nw.err
		}
	}
	for n > 0 {
		if nw.err != nil {
			return nw.err
		}
		if len(nw.buf) == cap(nw.buf) && nw.flush() != nil {
			return nw.err
		}
		room := int64(cap(nw.buf) - len(nw.buf))
		m, err := r.Read(nw.buf[len(nw.buf) : len(nw.buf)+int(min(room, n))])
		nw.buf = nw.buf[:len(nw.buf)+m]
		n -= int64(m)
		if err == io.EOF {
			if n > 0 {
				return fmt.Errorf("%w: %d bytes short", io.ErrUnexpectedEOF, n)
			}
			break
		}
		if err != nil {
			return err
		}
	}
	return nw.err
}

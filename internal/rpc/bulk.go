package rpc

import (
	"errors"
	"sync/atomic"

	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// Messages such as ByteStream's WriteRequest and ReadResponse are mostly
// one bytes field of up to a few MiB. Decoding them the usual way copies
// that field twice: the HTTP/2 frames it arrived in are joined into one
// buffer, and proto.Unmarshal copies the field out of it. Encoding copies
// it into an encode buffer, which grpc-go then copies again into its
// write buffer. The codec skips one copy each way:
//
//   - Unmarshal copies a large top-level bytes field straight from the
//     frames into the message and decodes only the rest with proto.
//   - Marshal of a message wrapped in Bulk sends its large bytes fields
//     from the caller's memory, and can tell the caller when grpc-go is
//     done with it (Bulk.Release).

// bulkMin is the size from which a bytes field takes the bulk path.
const bulkMin = 64 << 10

// Bulk wraps a message for SendMsg: the codec sends its large top-level
// bytes fields from the message's own memory instead of copying them
// into an encode buffer. The caller must not modify those bytes until
// the RPC has ended (for a client stream: CloseAndRecv has returned).
type Bulk struct {
	proto.Message
	// Release, if set, is called once the codec no longer needs the large
	// fields' memory: when grpc-go has written them to the connection or
	// dropped them. It is not called if SendMsg fails before it encodes
	// the message; the memory is then left to the garbage collector.
	Release func()
}

// releaser is the BufferPool of a Bulk message's large fields: grpc-go
// puts each back when it has written it, and the last one calls Release.
type releaser struct {
	left    atomic.Int32
	release func()
}

func (r *releaser) Get(n int) *[]byte { return pool.Get(n) }

func (r *releaser) Put(*[]byte) {
	if r.left.Add(-1) == 0 {
		r.release()
	}
}

// marshalBulk encodes b: the message without its large bytes fields,
// then each of those as a field header and the field's own memory.
func marshalBulk(b Bulk) (mem.BufferSlice, error) {
	src := b.ProtoReflect()
	var big []protoreflect.FieldDescriptor
	src.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		if isBulkField(fd) && len(v.Bytes()) >= bulkMin {
			big = append(big, fd)
		}
		return true
	})
	if len(big) == 0 {
		s, err := codec{}.Marshal(b.Message)
		if b.Release != nil {
			b.Release() // copied, or failed
		}
		return s, err
	}
	rest := src.New()
	src.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		if !isBulkField(fd) || len(v.Bytes()) < bulkMin {
			rest.Set(fd, v) // shares v: only read, by Marshal below
		}
		return true
	})
	rest.SetUnknown(src.GetUnknown())
	head, err := proto.MarshalOptions{}.Marshal(rest.Interface())
	if err != nil {
		if b.Release != nil {
			b.Release()
		}
		return nil, err
	}
	var rel *releaser
	if b.Release != nil {
		rel = &releaser{release: b.Release}
		rel.left.Store(int32(len(big)))
	}
	out := make(mem.BufferSlice, 0, 2*len(big))
	for _, fd := range big {
		data := src.Get(fd).Bytes()
		head = protowire.AppendTag(head, fd.Number(), protowire.BytesType)
		head = protowire.AppendVarint(head, uint64(len(data)))
		var buf mem.Buffer = mem.SliceBuffer(data)
		if rel != nil {
			buf = mem.NewBuffer(&data, rel) // len(data) >= bulkMin: a counted buffer
		}
		out = append(out, mem.SliceBuffer(head), buf)
		head = nil
	}
	return out, nil
}

// isBulkField reports whether fd is a singular bytes field outside any
// oneof, which the bulk paths may set and send on their own.
func isBulkField(fd protoreflect.FieldDescriptor) bool {
	return fd.Kind() == protoreflect.BytesKind && fd.Cardinality() != protoreflect.Repeated &&
		fd.ContainingOneof() == nil
}

// ReleaseBuffer gives a large bytes field of a received message back to
// the codec's buffer pool, for the next message: the caller owns the
// message and nothing reads b any more. Received large fields come from
// the pool, so that they need neither fresh memory nor zeroing; one that
// is never released is left to the garbage collector.
func ReleaseBuffer(b []byte) {
	if cap(b) >= bulkMin {
		pool.Put(&b)
	}
}

// errNotBulk sends unmarshalBulk's caller to the ordinary path.
var errNotBulk = errors.New("rpc: not a bulk message")

// unmarshalBulk decodes data into m, copying large bytes fields from the
// frames directly into m. Everything else is gathered and decoded by
// proto.Unmarshal, so unknown fields and the last-one-wins rule behave as
// usual. It returns errNotBulk, having changed nothing, for inputs it
// leaves to proto (no large field, or groups).
func unmarshalBulk(data mem.BufferSlice, m proto.Message) error {
	c := cursor{bufs: data}
	fields := m.ProtoReflect().Descriptor().Fields()
	type field struct {
		fd   protoreflect.FieldDescriptor
		data []byte
	}
	var big []field
	var rest []byte
	for !c.done() {
		start := len(rest)
		tag, err := c.varint()
		if err != nil {
			return err
		}
		rest = protowire.AppendVarint(rest, tag)
		num, typ := protowire.DecodeTag(tag)
		if num <= 0 {
			return errors.New("rpc: invalid field number")
		}
		switch typ {
		case protowire.VarintType:
			v, err := c.varint()
			if err != nil {
				return err
			}
			rest = protowire.AppendVarint(rest, v)
		case protowire.Fixed32Type:
			if rest, err = c.appendN(rest, 4); err != nil {
				return err
			}
		case protowire.Fixed64Type:
			if rest, err = c.appendN(rest, 8); err != nil {
				return err
			}
		case protowire.BytesType:
			n, err := c.varint()
			if err != nil {
				return err
			}
			if n > uint64(c.left()) {
				return errors.New("rpc: truncated message")
			}
			fd := fields.ByNumber(num)
			if fd != nil && isBulkField(fd) {
				// The last occurrence of a field wins: drop an earlier
				// large one (an earlier small one is in rest, and loses
				// to the Set below).
				for i := range big {
					if big[i].fd == fd {
						big = append(big[:i], big[i+1:]...)
						break
					}
				}
				if n >= bulkMin {
					b := (*pool.Get(int(n)))[:n] // see ReleaseBuffer
					c.read(b)
					big = append(big, field{fd, b})
					rest = rest[:start]
					continue
				}
			}
			rest = protowire.AppendVarint(rest, n)
			if rest, err = c.appendN(rest, int(n)); err != nil {
				return err
			}
		default:
			return errNotBulk
		}
	}
	if len(big) == 0 {
		return errNotBulk
	}
	if err := proto.Unmarshal(rest, m); err != nil {
		return err
	}
	// big holds the fields whose last occurrence was large: those win
	// over any earlier small one that proto decoded from rest.
	r := m.ProtoReflect()
	for _, f := range big {
		r.Set(f.fd, protoreflect.ValueOfBytes(f.data))
	}
	return nil
}

// cursor reads across the buffers of a received message.
type cursor struct {
	bufs mem.BufferSlice
	i    int    // current buffer
	cur  []byte // unread part of it
}

func (c *cursor) fill() bool {
	for len(c.cur) == 0 {
		if c.i >= len(c.bufs) {
			return false
		}
		c.cur = c.bufs[c.i].ReadOnlyData()
		c.i++
	}
	return true
}

func (c *cursor) done() bool { return !c.fill() }

func (c *cursor) left() int {
	n := len(c.cur)
	for _, b := range c.bufs[c.i:] {
		n += b.Len()
	}
	return n
}

func (c *cursor) varint() (uint64, error) {
	var v uint64
	for shift := uint(0); shift < 64; shift += 7 {
		if !c.fill() {
			return 0, errors.New("rpc: truncated varint")
		}
		b := c.cur[0]
		c.cur = c.cur[1:]
		v |= uint64(b&0x7f) << shift
		if b < 0x80 {
			return v, nil
		}
	}
	return 0, errors.New("rpc: varint overflow")
}

// read fills p, which the caller has checked is no longer than left().
func (c *cursor) read(p []byte) {
	for len(p) > 0 && c.fill() {
		n := copy(p, c.cur)
		c.cur, p = c.cur[n:], p[n:]
	}
}

func (c *cursor) appendN(dst []byte, n int) ([]byte, error) {
	if n > c.left() {
		return dst, errors.New("rpc: truncated message")
	}
	for n > 0 && c.fill() {
		k := min(n, len(c.cur))
		dst = append(dst, c.cur[:k]...)
		c.cur, n = c.cur[k:], n-k
	}
	return dst, nil
}

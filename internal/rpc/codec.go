package rpc

import (
	"fmt"

	"google.golang.org/grpc/encoding"
	_ "google.golang.org/grpc/encoding/proto" // registered first, replaced below
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/protoadapt"
)

// grpc-go's proto codec takes its buffers from mem.DefaultBufferPool,
// whatever pool the server or client is configured with. A message that
// arrives in several HTTP/2 frames is copied into one buffer from that
// pool before it is decoded, and the pool zeroes the buffer: 1 MiB for
// every 64 KiB ByteStream chunk. This codec does the same work with
// BufferPool. Importing this package installs it for the whole process.
func init() {
	encoding.RegisterCodecV2(codec{})
}

type codec struct{}

// Name is "proto": the codec replaces grpc-go's default.
func (codec) Name() string { return "proto" }

func message(v any) (proto.Message, error) {
	switch v := v.(type) {
	case protoadapt.MessageV2:
		return v, nil
	case protoadapt.MessageV1:
		return protoadapt.MessageV2Of(v), nil
	}
	return nil, fmt.Errorf("rpc codec: %T is not a proto.Message", v)
}

// Marshal encodes v into a pooled buffer (fully overwritten, so it needs no
// zeroing).
func (codec) Marshal(v any) (mem.BufferSlice, error) {
	switch v := v.(type) {
	case *Frame:
		return mem.BufferSlice{mem.SliceBuffer(v.Data)}, nil
	case Bulk:
		return marshalBulk(v)
	}
	m, err := message(v)
	if err != nil {
		return nil, err
	}
	size := proto.Size(m)
	opts := proto.MarshalOptions{UseCachedSize: true}
	if mem.IsBelowBufferPoolingThreshold(size) {
		b, err := opts.Marshal(m)
		if err != nil {
			return nil, err
		}
		return mem.BufferSlice{mem.SliceBuffer(b)}, nil
	}
	bp := pool.Get(size)
	b, err := opts.MarshalAppend((*bp)[:0], m)
	if err != nil {
		pool.Put(bp)
		return nil, err
	}
	*bp = b
	return mem.BufferSlice{mem.NewBuffer(bp, pool)}, nil
}

// Unmarshal decodes data into v. proto.Unmarshal copies what it keeps, so
// the buffer goes back to the pool at once. A message with a large bytes
// field takes the bulk path (see Bulk), which copies that field once.
func (codec) Unmarshal(data mem.BufferSlice, v any) error {
	if f, ok := v.(*Frame); ok {
		f.Data = data.Materialize()
		return nil
	}
	m, err := message(v)
	if err != nil {
		return err
	}
	if data.Len() >= bulkMin {
		if err := unmarshalBulk(data, m); err != errNotBulk {
			return err
		}
	}
	buf := data.MaterializeToBuffer(pool)
	defer buf.Free()
	return proto.Unmarshal(buf.ReadOnlyData(), m)
}

// Frame is an encoded message that the codec passes through untouched, in
// both directions: a proxy receives and sends Frames without decoding.
type Frame struct {
	Data []byte
}

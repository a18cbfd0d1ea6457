package castore

import (
	"context"
	"errors"
	"fmt"
	"io"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"tvixfarm/cas/blobstore"
	"tvixfarm/internal/rpc"
	snixcastorepb "tvixfarm/proto/snix/castore/v1"
	castorepb "tvixfarm/proto/tvix/castore/v1"
)

// ReadChunkSize is the size of the BlobChunks Read sends: well under the 4
// MiB Rust clients accept per message.
const ReadChunkSize = 1 << 20

// Register serves the castore BlobService and DirectoryService of st on s
// under both tvix.castore.v1 and snix.castore.v1.
func Register(s grpc.ServiceRegistrar, st *Store) {
	bs, ds := NewBlobServer(st), NewDirectoryServer(st)
	castorepb.RegisterBlobServiceServer(s, bs)
	castorepb.RegisterDirectoryServiceServer(s, ds)
	RegisterAs(s, &castorepb.BlobService_ServiceDesc, &snixcastorepb.BlobService_ServiceDesc, bs)
	RegisterAs(s, &castorepb.DirectoryService_ServiceDesc, &snixcastorepb.DirectoryService_ServiceDesc, ds)
}

// RegisterAs registers impl, a server of the service desc, under the name
// of the service as, whose messages are wire-identical to desc's (Snix's
// castore and store services are Tvix's under another package): the
// handlers decode the requests into desc's types. Reflection describes the
// service from as's own file.
func RegisterAs(s grpc.ServiceRegistrar, desc, as *grpc.ServiceDesc, impl any) {
	d := *desc
	d.ServiceName = as.ServiceName
	d.Metadata = as.Metadata
	// Unary handlers name their method to interceptors themselves: give
	// interceptors (logging, metrics) the name the client called.
	d.Methods = make([]grpc.MethodDesc, len(desc.Methods))
	for i, m := range desc.Methods {
		h, full := m.Handler, "/"+as.ServiceName+"/"+m.MethodName
		d.Methods[i] = grpc.MethodDesc{MethodName: m.MethodName, Handler: func(srv any, ctx context.Context, dec func(any) error, ic grpc.UnaryServerInterceptor) (any, error) {
			if ic == nil {
				return h(srv, ctx, dec, nil)
			}
			return h(srv, ctx, dec, func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
				return ic(ctx, req, &grpc.UnaryServerInfo{Server: info.Server, FullMethod: full}, handler)
			})
		}}
	}
	s.RegisterService(&d, impl)
}

// NewBlobServer returns the castore BlobService of st.
func NewBlobServer(st *Store) castorepb.BlobServiceServer { return &blobServer{st: st} }

type blobServer struct {
	castorepb.UnimplementedBlobServiceServer
	st *Store
}

// Stat answers NotFound for a missing blob, and an empty chunk list (no
// finer chunking) for one that exists, whatever send_chunks says.
func (b *blobServer) Stat(ctx context.Context, req *castorepb.StatBlobRequest) (*castorepb.StatBlobResponse, error) {
	h, err := toHash(req.Digest)
	if err != nil {
		return nil, err
	}
	if _, err := b.st.StatBlob(ctx, h); err != nil {
		return nil, err
	}
	return &castorepb.StatBlobResponse{}, nil
}

func (b *blobServer) Read(req *castorepb.ReadBlobRequest, stream grpc.ServerStreamingServer[castorepb.BlobChunk]) error {
	h, err := toHash(req.Digest)
	if err != nil {
		return err
	}
	rc, d, err := b.st.OpenBlob(stream.Context(), h)
	if err != nil {
		return err
	}
	defer rc.Close()
	if cr, ok := rc.(blobstore.ChunkedReader); ok && ReadChunkSize >= 1<<20 {
		// The store's buffers (up to a MiB each) go out as chunks
		// without a copy.
		n, err := cr.WriteTo(chunkSender{stream})
		if err == nil && n != d.Size() {
			err = fmt.Errorf("%d of %d bytes", n, d.Size())
		}
		if err != nil {
			if _, ok := status.FromError(err); !ok || status.Code(err) == codes.Unknown {
				err = status.Errorf(codes.Internal, "castore: read blob %s: %v", d, err)
			}
		}
		return err
	}
	buf := make([]byte, min(int64(ReadChunkSize), d.Size()))
	var sent int64
	for sent < d.Size() {
		n, err := io.ReadFull(rc, buf[:min(int64(len(buf)), d.Size()-sent)])
		if err != nil {
			if _, ok := status.FromError(err); !ok || status.Code(err) == codes.Unknown {
				err = status.Errorf(codes.Internal, "castore: read blob %s: %v", d, err)
			}
			return err
		}
		if err := stream.Send(&castorepb.BlobChunk{Data: buf[:n]}); err != nil {
			return err
		}
		sent += int64(n)
	}
	return nil
}

// chunkSender sends each write as one BlobChunk.
type chunkSender struct {
	stream grpc.ServerStreamingServer[castorepb.BlobChunk]
}

func (w chunkSender) Write(p []byte) (int, error) {
	if err := w.stream.Send(&castorepb.BlobChunk{Data: p}); err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteOwned sends p without copying it (blobstore.OwningWriter).
func (w chunkSender) WriteOwned(p []byte, release func()) (int, error) {
	if err := w.stream.SendMsg(rpc.Bulk{Message: &castorepb.BlobChunk{Data: p}, Release: release}); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Put stores the blob once the client has closed the stream; a stream that
// breaks first stores nothing.
func (b *blobServer) Put(stream grpc.ClientStreamingServer[castorepb.BlobChunk, castorepb.PutBlobResponse]) error {
	d, err := b.st.PutBlob(stream.Context(), &chunkReader{recv: stream.Recv})
	if err != nil {
		return err
	}
	h := d.Hash()
	return stream.SendAndClose(&castorepb.PutBlobResponse{Digest: h[:]})
}

// chunkReader reads the data of a stream of BlobChunks.
type chunkReader struct {
	recv func() (*castorepb.BlobChunk, error)
	buf  []byte
}

func (c *chunkReader) Read(p []byte) (int, error) {
	for len(c.buf) == 0 {
		m, err := c.recv()
		if err == io.EOF {
			return 0, io.EOF
		}
		if err != nil {
			return 0, status.Errorf(status.Code(err), "castore: put blob: stream broken: %v", status.Convert(err).Message())
		}
		c.buf = m.Data
	}
	n := copy(p, c.buf)
	c.buf = c.buf[n:]
	return n, nil
}

// WriteTo hands whole chunks to w, without a copy.
func (c *chunkReader) WriteTo(w io.Writer) (int64, error) {
	var total int64
	for {
		if len(c.buf) > 0 {
			n, err := w.Write(c.buf)
			total += int64(n)
			c.buf = c.buf[n:]
			if err != nil {
				return total, err
			}
		}
		m, err := c.recv()
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, status.Errorf(status.Code(err), "castore: put blob: stream broken: %v", status.Convert(err).Message())
		}
		c.buf = m.Data
	}
}

// NewDirectoryServer returns the castore DirectoryService of st.
func NewDirectoryServer(st *Store) castorepb.DirectoryServiceServer {
	return &directoryServer{st: st}
}

type directoryServer struct {
	castorepb.UnimplementedDirectoryServiceServer
	st *Store
}

func (s *directoryServer) Get(req *castorepb.GetDirectoryRequest, stream grpc.ServerStreamingServer[castorepb.Directory]) error {
	if req.GetByWhat() == nil {
		return status.Error(codes.InvalidArgument, "castore: by_what is not set")
	}
	h, err := toHash(req.GetDigest())
	if err != nil {
		return err
	}
	if !req.Recursive {
		d, err := s.st.GetDirectory(stream.Context(), h)
		if err != nil {
			return err
		}
		return stream.Send(d)
	}
	return s.st.WalkDirectories(stream.Context(), h, stream.Send)
}

// Put validates each directory as it arrives and stores the closure once
// the stream has ended and the closure is complete.
func (s *directoryServer) Put(stream grpc.ClientStreamingServer[castorepb.Directory, castorepb.PutDirectoryResponse]) error {
	c := NewClosure()
	for {
		d, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		if err := c.Add(d); err != nil {
			return err
		}
	}
	root, err := s.st.PutDirectories(stream.Context(), c)
	if err != nil {
		return err
	}
	return stream.SendAndClose(&castorepb.PutDirectoryResponse{RootDigest: root[:]})
}

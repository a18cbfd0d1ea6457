package rpc

import (
	"context"
	"io"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// Proxy forwards the call on ss (method, with the streaming shape desc)
// to conn, message by message in both directions, without decoding the
// messages. The incoming metadata is forwarded, minus the transport's
// own headers, plus extra (key, value pairs).
func Proxy(ss grpc.ServerStream, conn grpc.ClientConnInterface, method string, desc *grpc.StreamDesc, extra ...string) error {
	ctx, cancel := context.WithCancel(ForwardContext(ss.Context(), extra...))
	defer cancel()
	cs, err := conn.NewStream(ctx, desc, method)
	if err != nil {
		return err
	}
	go func() {
		for {
			var fr Frame
			if err := ss.RecvMsg(&fr); err != nil {
				if err == io.EOF {
					cs.CloseSend()
				} else {
					cancel()
				}
				return
			}
			if err := cs.SendMsg(&fr); err != nil {
				return // RecvMsg below reports why
			}
		}
	}()
	if hdr, err := cs.Header(); err == nil && len(hdr) > 0 {
		ss.SendHeader(hdr)
	}
	for {
		var fr Frame
		if err := cs.RecvMsg(&fr); err != nil {
			ss.SetTrailer(cs.Trailer())
			if err == io.EOF {
				return nil
			}
			return err
		}
		if err := ss.SendMsg(&fr); err != nil {
			return err
		}
	}
}

// ForwardContext returns ctx with the incoming metadata as outgoing
// metadata, minus the transport's own headers, plus extra (key, value
// pairs): for forwarding a call to another server.
func ForwardContext(ctx context.Context, extra ...string) context.Context {
	in, _ := metadata.FromIncomingContext(ctx)
	out := metadata.MD{}
	for k, v := range in {
		if strings.HasPrefix(k, ":") || strings.HasPrefix(k, "grpc-") || k == "content-type" || k == "user-agent" || k == "te" {
			continue
		}
		out[k] = v
	}
	for i := 0; i+1 < len(extra); i += 2 {
		out.Set(extra[i], extra[i+1])
	}
	return metadata.NewOutgoingContext(ctx, out)
}

// ProxyHandler is a grpc.UnknownServiceHandler that forwards every call
// of a service this server does not implement to conn, as a
// bidirectional stream (which carries unary and streaming calls alike).
func ProxyHandler(conn grpc.ClientConnInterface) grpc.StreamHandler {
	return func(srv any, ss grpc.ServerStream) error {
		method, _ := grpc.MethodFromServerStream(ss)
		return Proxy(ss, conn, method, &grpc.StreamDesc{ServerStreams: true, ClientStreams: true})
	}
}

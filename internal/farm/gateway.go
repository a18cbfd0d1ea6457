package farm

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
	"tvixfarm/cas/grpcservers"
	"tvixfarm/frontend/gateway"
	"tvixfarm/internal/config"
)

// newGateway starts the remote execution backend (gateway mode): a
// connection to the remote with the configured TLS and headers, and the
// REAPI Execution service that forwards to it. What needs closing is
// put first in f.closers.
func (f *Farm) newGateway(ctx context.Context, r *config.Remote, stores *blobstore.Instances, log *slog.Logger) (*gateway.Remote, error) {
	opts, err := remoteDialOptions(r)
	if err != nil {
		return nil, err
	}
	conn, err := grpc.NewClient(r.Address, opts...)
	if err != nil {
		return nil, fmt.Errorf("execution.remote.address: %w", err)
	}
	fn, _ := digest.FunctionFromName(r.DigestFunction)
	g, err := gateway.New(ctx, conn, stores, gateway.Config{
		Address:          r.Address,
		Instance:         r.InstanceName,
		DigestFunction:   fn,
		Platform:         r.Platform,
		PassProperties:   r.Passed(),
		Concurrency:      r.Concurrency,
		ActionTimeout:    time.Duration(r.ActionTimeout),
		RPCTimeout:       time.Duration(r.RPCTimeout),
		IsolatedNetwork:  r.IsolatedNetwork,
		AllowUnisolated:  r.AllowUnisolated,
		AllowFixedOutput: r.AllowFixedOutput,
		Logger:           log,
	})
	if err != nil {
		conn.Close()
		return nil, err
	}
	// Closed before the stores its operations use.
	f.closers = append([]io.Closer{g, conn}, f.closers...)
	return g, nil
}

// remoteDialOptions are the options of the connection to the remote:
// TLS or plain text, the headers on every call, and messages as large as
// the farm's own.
func remoteDialOptions(r *config.Remote) ([]grpc.DialOption, error) {
	headers, err := r.LoadHeaders()
	if err != nil {
		return nil, err
	}
	opts := []grpc.DialOption{
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(grpcservers.MaxRecvMsgSize)),
		grpc.WithInitialWindowSize(16 << 20), grpc.WithInitialConnWindowSize(16 << 20),
	}
	if t := r.TLS; t != nil {
		tc := &tls.Config{ServerName: t.ServerName, MinVersion: tls.VersionTLS12}
		if t.CAFile != "" {
			pem, err := os.ReadFile(t.CAFile)
			if err != nil {
				return nil, fmt.Errorf("execution.remote.tls.ca_file: %w", err)
			}
			tc.RootCAs = x509.NewCertPool()
			if !tc.RootCAs.AppendCertsFromPEM(pem) {
				return nil, errors.New("execution.remote.tls.ca_file: no PEM certificate in it")
			}
		}
		if t.CertFile != "" {
			c, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile)
			if err != nil {
				return nil, fmt.Errorf("execution.remote.tls: client certificate: %w", err)
			}
			tc.Certificates = []tls.Certificate{c}
		}
		opts = append(opts, grpc.WithTransportCredentials(credentials.NewTLS(tc)))
	} else {
		opts = append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()))
	}
	if len(headers) > 0 {
		var kv []string
		for k, v := range headers {
			kv = append(kv, k, v)
		}
		opts = append(opts,
			grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
				return invoker(metadata.AppendToOutgoingContext(ctx, kv...), method, req, reply, cc, opts...)
			}),
			grpc.WithChainStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
				return streamer(metadata.AppendToOutgoingContext(ctx, kv...), desc, cc, method, opts...)
			}))
	}
	return opts, nil
}

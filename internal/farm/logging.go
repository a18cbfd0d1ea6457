package farm

import (
	"context"
	"log/slog"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// unaryLogger logs failed and slow calls at debug level (errors the server
// itself caused at warn).
func unaryLogger(log *slog.Logger) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		start := time.Now()
		resp, err := h(ctx, req)
		logCall(log, info.FullMethod, start, err)
		return resp, err
	}
}

func streamLogger(log *slog.Logger) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		start := time.Now()
		err := h(srv, ss)
		logCall(log, info.FullMethod, start, err)
		return err
	}
}

func logCall(log *slog.Logger, method string, start time.Time, err error) {
	switch status.Code(err) {
	case codes.OK:
		log.Debug("rpc", "method", method, "took", time.Since(start))
	case codes.Internal, codes.DataLoss, codes.Unknown:
		log.Warn("rpc failed", "method", method, "took", time.Since(start), "err", err)
	default:
		log.Debug("rpc failed", "method", method, "took", time.Since(start), "err", err)
	}
}

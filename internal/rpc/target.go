package rpc

import (
	"fmt"
	"net"
	"strings"
	"sync/atomic"

	"google.golang.org/grpc"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
)

// Target turns an address setting into a gRPC target and the dial
// options it needs. A single HOST:PORT (or any gRPC target, such as
// dns:///name:port) is used as it is. A comma-separated list of HOST:PORT
// addresses, such as the nodes of a scheduler cluster, becomes one
// channel over all of them: it uses the first that answers, and moves to
// another when that one dies.
func Target(addrs string) (string, []grpc.DialOption, error) {
	if !strings.Contains(addrs, ",") {
		return addrs, nil, nil
	}
	var list []resolver.Address
	for a := range strings.SplitSeq(addrs, ",") {
		a = strings.TrimSpace(a)
		if _, _, err := net.SplitHostPort(a); err != nil {
			return "", nil, fmt.Errorf("address %q in %q: %v", a, addrs, err)
		}
		list = append(list, resolver.Address{Addr: a})
	}
	r := manual.NewBuilderWithScheme(fmt.Sprintf("tvixfarm-list-%d", listSeq.Add(1)))
	r.InitialState(resolver.State{Addresses: list})
	return r.Scheme() + ":///cluster", []grpc.DialOption{grpc.WithResolvers(r)}, nil
}

var listSeq atomic.Int64

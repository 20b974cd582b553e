//! The protobuf codec of the synopsis API: prost's, except that bytes which do not decode as
//! the expected message are INVALID_ARGUMENT, not prost's INTERNAL. The peer sent them; an
//! INTERNAL would tell a client the server is broken (gRPC's status table lists INTERNAL for
//! this case, and says INVALID_ARGUMENT is for a request the server cannot use whatever its
//! state, which is what a malformed message is).

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// [`ProstCodec`] with decode failures as INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct SynopsisCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for SynopsisCodec<T, U> {
    fn default() -> Self {
        SynopsisCodec(ProstCodec::default())
    }
}

impl<T, U> Codec for SynopsisCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = SynopsisDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        SynopsisDecoder(self.0.decoder())
    }
}

/// [`ProstDecoder`] with its INTERNAL decode errors turned into INVALID_ARGUMENT.
#[derive(Debug)]
pub struct SynopsisDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for SynopsisDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|status| {
            if status.code() == Code::Internal {
                Status::invalid_argument(format!(
                    "the message does not decode as {}: {}",
                    std::any::type_name::<U>()
                        .rsplit("::")
                        .next()
                        .unwrap_or("the expected message"),
                    status.message()
                ))
            } else {
                status
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
